"""Engine processes: argv rendering, ports, logs, process groups, the spawn record, handles, spawning.

Every engine runs in its own session and process group (``start_new_session=True``, so its
pgid equals its pid) with stdout and stderr going straight to a per-pool log file: the daemon is
not in the engine's output path, so a slow or dead daemon never blocks or SIGPIPEs an engine.

Exit is observed by watching the child's pidfd on the event loop (no thread per engine), never by
polling. When the leader exits, for whatever reason, the whole group is SIGKILLed so no
grandchild outlives it.

Processes this daemon did not spawn (found in the spawn record after a restart) cannot be
waited on; :func:`~pool_managerd.adapters.engines.procs.wait_pid_exit` uses a pidfd where the
kernel has one (an event, not a poll) and falls back to a short poll otherwise. Zombies count as
dead everywhere in this package: a killed process whose parent does not reap it (a container's
pid 1 often does not) holds no memory, GPU or port any more.

Modules: :mod:`.errors`, :mod:`.argv` (templates), :mod:`.ports`, :mod:`.logs` (rotation),
:mod:`.procs` (/proc and process-group signals), :mod:`.record` (the spawn record),
:mod:`.handles` (running engines, spawned or adopted), :mod:`.spawn` (starting one).
"""
