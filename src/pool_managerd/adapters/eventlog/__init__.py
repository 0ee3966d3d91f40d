"""The JetStream event log (DESIGN.md §5): stream setup, the fenced publisher, replay, snapshots.

Modules: :mod:`.jetstream` (error codes, header names), :mod:`.errors`, :mod:`.stream` (setup),
:mod:`.reading`, :mod:`.publisher`, :mod:`.snapshots` (the KV bucket).

* :func:`ensure_stream` / :func:`ensure_kv` create or update stream ``POOLD_EVENTS`` (file
  storage) and KV bucket ``poold_pools`` idempotently; every daemon calls them at start.
* :class:`EventPublisher` appends :class:`~pool_managerd.contract.messages.Event` objects in order per
  pool: one at a time within a pool, many pools in flight at once. Pool events carry ``Nats-Msg-Id: <pool>:<seq>`` and
  ``Nats-Expected-Last-Subject-Sequence`` over ``poold.evt.<pool>.>``, so a second daemon
  writing the same pool is refused by the server (error 10071) and this publisher *fences* the
  pool. Transport failures are retried in order from a bounded backlog.
* :func:`read_events` replays a range of the stream (one pool or all) up to the sequence that
  was last when it was called.
* :class:`SnapshotStore` keeps the derived :class:`~pool_managerd.contract.messages.PoolSnapshot` per pool
  in the KV bucket and watches it.
"""
