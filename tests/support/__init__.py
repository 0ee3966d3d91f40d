"""What the test modules share: deadlines (:mod:`.deadlines`), engine processes and the leak
guard (:mod:`.procs`), the contract as a client reads it (:mod:`.contract`), the recorded GPUs
(:mod:`.gpu`), the pinned nats-server releases (:mod:`.nats_versions`), the daemon as a
subprocess and the event wire it is watched on (:mod:`.rig`), the commands as subprocesses and a
daemon to run them against (:mod:`.cli`), requests and event waits over NATS
(:mod:`.daemon_wire`), the pure lifecycle driven by a scripted shell (:mod:`.lifecycle_harness`),
and the markers every test gets from its folder (:mod:`.markers`).
Fixtures stay in ``tests/conftest.py``; no test module imports another."""
