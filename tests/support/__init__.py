"""What the test modules share: deadlines (:mod:`.deadlines`), engine processes and the leak
guard (:mod:`.procs`), the contract as a client reads it (:mod:`.contract`), the recorded GPUs
(:mod:`.gpu`), the pinned nats-server releases (:mod:`.nats_versions`) and the markers every test
gets from what it uses (:mod:`.markers`). Fixtures stay in ``tests/conftest.py``."""
