"""The pool machine: ONE shared ``transitions.Machine`` for every pool of a node, and the step
the shell calls for each typed input.

Each public method of :class:`PoolMachine` is one pure step: an input and a :class:`~pool_managerd.
core.definitions.Context` in, an :class:`~pool_managerd.core.pool_model.Outcome` out. The rows it
fires are the table's (:mod:`pool_managerd.core.table`); the callbacks they name are the pool
model's (:mod:`pool_managerd.core.pool_model`); a command's step is
:mod:`pool_managerd.core.command_step`'s.
"""

from __future__ import annotations

import msgspec
from transitions import Machine

from pool_managerd.contract.errors import UnknownPool
from pool_managerd.contract.messages import (
    DrainCmd,
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    GpuVerified,
    HealthChanged,
    HealthReport,
    InternalError,
    PoolClaimed,
    PoolCommand,
    PoolReleased,
    PoolState,
    Rejected,
    StatusCmd,
    StopCmd,
    command_fingerprint,
)
from pool_managerd.core import gpu_verify
from pool_managerd.core.command_step import run_command
from pool_managerd.core.definitions import Context, Planner, PoolDefinition
from pool_managerd.core.effects import (
    ReleaseEngine,
    StopEngine,
    TimerName,
    VerifyGpus,
)
from pool_managerd.core.health import assess
from pool_managerd.core.inputs import (
    ClaimInput,
    CommandInput,
    EngineAdoptedInput,
    EngineExitedInput,
    EngineStarted,
    ExpireLeases,
    GpuChecked,
    HealthInput,
    PoolInput,
    ReleaseInput,
    RemoveInput,
    RestoreInput,
    SpawnFailed,
    TimerFired,
    label,
)
from pool_managerd.core.pool_model import Checkpoint, Outcome, PoolModel
from pool_managerd.core.registry import Registry
from pool_managerd.core.state import PoolValue
from pool_managerd.core.table import INITIAL, ROWS, STATES
from pool_managerd.lifecycle import drain as drain_policy
from pool_managerd.lifecycle import preload as preload_policy

# ----------------------------------------------------------------------------------------------
# The lifecycle: the shared machine and the pure step functions the shell calls
# ----------------------------------------------------------------------------------------------


def _build_machine() -> Machine:
    transitions = [
        {
            "trigger": r.trigger,
            "source": r.source,
            "dest": r.dest,
            "prepare": list(r.prepare),
            "conditions": list(r.conditions),
            "unless": list(r.unless),
            "after": list(r.after),
        }
        for r in ROWS
    ]
    return Machine(
        model=None,
        states=list(STATES),
        transitions=transitions,
        initial=INITIAL,
        auto_transitions=False,
        send_event=True,
        queued="model",  # type: ignore[arg-type]  # the stubs predate per-model queues
        ignore_invalid_triggers=False,
        before_state_change="_record",
    )


class PoolMachine:
    """Every pool of one node in one shared machine. Each public method is one pure step:
    inputs (a command or a fact, and a :class:`Context`) in, an :class:`Outcome` out."""

    def __init__(self, node: str, planner: Planner, registry: Registry | None = None) -> None:
        self.node = node
        self.planner = planner
        self.registry = registry if registry is not None else Registry(node)
        self.machine = _build_machine()
        self.pools: dict[str, PoolModel] = {}

    # --- pools -------------------------------------------------------------------------------

    def register(self, definition: PoolDefinition, *, simulated: bool = False) -> PoolModel:
        """Add a pool in ``unready`` (the only way a pool comes to exist)."""
        model = PoolModel(definition, self.node, self.planner, simulated=simulated)
        self.registry.register(definition.pool, lambda: model.entry)
        self.machine.add_model(model, initial=INITIAL)
        self.pools[definition.pool] = model
        return model

    def unregister(self, pool: str) -> None:
        """Forget a pool (removed from the configuration and stopped); its events stay in the log."""
        model = self.pool(pool)
        self.machine.remove_model(model)
        self.registry.remove(pool)
        del self.pools[pool]

    def pool(self, pool: str) -> PoolModel:
        try:
            return self.pools[pool]
        except KeyError:
            raise UnknownPool(pool) from None

    def state(self, pool: str) -> PoolState:
        return self.pool(pool).state

    # --- the one entry point of the shell ------------------------------------------------------

    def step(self, pool: str, inp: PoolInput, ctx: Context) -> Outcome:
        """Apply one input to ``pool``: a transaction.

        Either the step completes (its events, effects and reply are returned, and ``undo`` can
        still put the pool back, should its events not reach the log), or it raises inside and
        nothing it did is kept: the pool is put back as it was, an ``internal_error`` event is
        recorded and the pool moves to ``failed``, so memory is never ahead of the log and the
        next event never leaves a sequence gap."""
        model = self.pool(pool)
        saved = model.checkpoint()
        try:
            outcome = self._dispatch(pool, inp, ctx)
        except Exception as exc:
            model.revert(saved)
            outcome = self._internal_error(model, inp, exc, ctx, saved)
        outcome.undo = saved
        return outcome

    def revert(self, pool: str, outcome: Outcome) -> None:
        """Undo a step whose events could not be appended (its effects must not run)."""
        if outcome.undo is not None and pool in self.pools:
            self.pools[pool].revert(outcome.undo)

    def _dispatch(self, pool: str, inp: PoolInput, ctx: Context) -> Outcome:
        if isinstance(inp, CommandInput):
            return self.command(pool, inp.cmd, ctx)
        if isinstance(inp, HealthInput):
            return self.health(pool, inp.report, ctx)
        if isinstance(inp, TimerFired):
            return self.timer_fired(pool, inp.name, inp.token, ctx)
        if isinstance(inp, EngineStarted):
            return self.engine_spawned(pool, inp.info, inp.cuda_visible_devices, ctx, inp.attempt)
        if isinstance(inp, SpawnFailed):
            return self.spawn_failed(pool, inp.error, ctx, inp.attempt)
        if isinstance(inp, EngineExitedInput):
            return self.engine_exited(pool, inp.pid, inp.exit_code, inp.signal, ctx)
        if isinstance(inp, EngineAdoptedInput):
            return self.engine_adopted(pool, inp.info, ctx)
        if isinstance(inp, RestoreInput):
            return self.restore(pool, inp.value, ctx)
        if isinstance(inp, RemoveInput):
            return self.remove(pool, inp.drain_s, ctx)
        if isinstance(inp, ExpireLeases):
            return self.expire_leases(pool, ctx)
        if isinstance(inp, ClaimInput):
            return self.claim(pool, inp, ctx)
        if isinstance(inp, ReleaseInput):
            return self.release_ownership(pool, ctx)
        if isinstance(inp, GpuChecked):
            return self.gpu_checked(pool, inp, ctx)
        raise TypeError(f"not a pool input: {type(inp).__name__}")

    def _internal_error(
        self, model: PoolModel, inp: PoolInput, exc: Exception, ctx: Context, saved: Checkpoint
    ) -> Outcome:
        name = label(inp)
        verb = name if isinstance(inp, CommandInput) else None
        model.begin(ctx)
        command_id = None
        if isinstance(inp, CommandInput):
            command_id = ctx.command_id or inp.cmd.command_id
            model.step_cause = (command_id, ctx.traceparent)
            model.fingerprint = command_fingerprint(inp.cmd)
        # The exception's class names the bug without leaking its text (paths, values) anywhere.
        error = type(exc).__name__
        try:
            model.emit(InternalError(step=name, error=error))
            if model.state != "failed":
                model.fire("internal_error", reason=f"internal error in step {name} ({error}); pool stopped")
        except Exception:
            # Even the way out failed: keep the pool exactly as it was and report the bare error.
            model.revert(saved)
            model.begin(ctx)
            command_id = model.cause[0] if verb is not None else None
        reply: Rejected | None = None
        if verb is not None:
            reply = Rejected(command_id=command_id, pool=model.pool_id, verb=verb, code="internal",
                             message=internal_error_message(verb, model.pool_id), state=model.state)  # fmt: skip
        return model.outcome(reply)

    def remove(self, pool: str, drain_s: float, ctx: Context) -> Outcome:
        """Take a pool the configuration dropped towards ``unready``: drain it if it serves (lease
        holders get ``drain_s``), let a plain drain run out, stop anything else."""
        model = self.pool(pool)
        cid = f"recovery-remove-{pool}"
        cmd: PoolCommand
        if model.state == "ready":
            cmd = DrainCmd(command_id=cid, deadline_s=drain_s)
        elif model.state in ("draining", "unready") and not model.reloading:
            cmd = StatusCmd(command_id=cid)  # its restored deadline stands, or nothing to do
        else:
            cmd = StopCmd(command_id=cid)  # preloading, restarting, failed, or a reload's drain
        return self.command(pool, cmd, ctx)

    # --- commands ------------------------------------------------------------------------------

    def command(self, pool: str, cmd: PoolCommand, ctx: Context) -> Outcome:
        """Apply one pool command. Never raises for bad requests: they become ``Rejected``."""
        return run_command(self.pool(pool), cmd, ctx, self.registry)

    # --- facts ---------------------------------------------------------------------------------

    def engine_spawned(
        self, pool: str, info: EngineInfo, cuda_visible_devices: str, ctx: Context, attempt: int | None = None
    ) -> Outcome:
        """The shell started the engine that ``SpawnEngine`` number ``attempt`` asked for."""
        model = self.pool(pool)
        model.begin(ctx)
        current = attempt is None or attempt == model.attempt
        if model.state == "preloading" and current:
            previous = model.value.engine
            if previous is not None and previous.pid != info.pid:
                # Never two engines for one pool: the one recorded earlier goes.
                model.stopping.add(previous.pid)
                model.effects.append(StopEngine(previous.pid, previous.pgid, 0.0, "superseded by a newer spawn"))
            model.emit(EngineSpawned(pid=info.pid, pgid=info.pgid, port=info.port, argv=list(info.argv),
                                     cuda_visible_devices=cuda_visible_devices, log_path=info.log_path,
                                     attempt=model.attempt))  # fmt: skip
            # The engine waits at its gate until this event is in the log.
            model.effects.append(ReleaseEngine(info.pid))
        else:
            # The pool moved on (stopped, drained) while the spawn was in flight: stop the newcomer.
            model.stopping.add(info.pid)
            model.effects.append(StopEngine(info.pid, info.pgid, 0.0, f"spawned after the pool became {model.state}"))
        return model.outcome(None)

    def engine_adopted(self, pool: str, info: EngineInfo, ctx: Context) -> Outcome:
        """After a daemon restart the engine the log names was found alive and taken over."""
        model = self.pool(pool)
        model.begin(ctx)
        model.emit(EngineAdopted(pid=info.pid, pgid=info.pgid, port=info.port))
        return model.outcome(None)

    def spawn_failed(self, pool: str, error: str, ctx: Context, attempt: int | None = None) -> Outcome:
        """The shell could not start the engine of spawn ``attempt`` (missing binary, port taken...).

        A report about an attempt the pool has moved past (stopped and preloaded again while the
        spawn was in flight) changes nothing."""
        model = self.pool(pool)
        model.begin(ctx)
        if model.state == "preloading" and (attempt is None or attempt == model.attempt):
            model.fire("preload_failed", cause=f"spawn failed: {error}")
        return model.outcome(None)

    def engine_exited(self, pool: str, pid: int, exit_code: int | None, signal: int | None, ctx: Context) -> Outcome:
        """An engine process ended (observed by waiting on it)."""
        model = self.pool(pool)
        model.begin(ctx)
        current = model.value.engine
        if current is None or current.pid != pid:
            expected = pid in model.stopping
            model.stopping.discard(pid)
            model.emit(EngineExited(pid=pid, exit_code=exit_code, signal=signal, expected=expected,
                                    during=model.state))  # fmt: skip
            return model.outcome(None)
        state = model.state
        model.emit(EngineExited(pid=pid, exit_code=exit_code, signal=signal, expected=False, during=state))
        if exit_code is not None:
            how = f"exit code {exit_code}"
        elif signal is not None:
            how = f"signal {signal}"
        else:
            how = "status unknown: it ended while no daemon was watching it"
        if state == "preloading":
            model.fire("preload_failed", cause=f"engine exited during load ({how})", exit_code=exit_code,
                       crashed=True)  # fmt: skip
        elif state == "ready":
            model.fire("engine_exited", cause=f"engine exited ({how})", exit_code=exit_code, crashed=True)
        elif state == "draining":
            model.fire("drained", reason=f"engine exited while draining ({how})",
                       leases_left=model.value.active_leases)  # fmt: skip
        return model.outcome(None)

    def health(self, pool: str, report: HealthReport, ctx: Context) -> Outcome:
        """Fold one health report; may make the pool ready or declare health lost."""
        model = self.pool(pool)
        model.begin(ctx)
        engine = model.value.engine
        if engine is None or (report.engine_pid is not None and report.engine_pid != engine.pid):
            return model.outcome(None)  # a report about an engine this pool no longer runs
        model.last_heartbeat = report.ts
        threshold = model.spec.probe_failure_threshold
        # "Loading" is expected while preloading; an engine that was ready and answers 503 again
        # cannot serve, so it counts against the threshold like a failed probe.
        loading = report.loading and model.state == "preloading"
        verdict = assess(model.health, ok=report.ok, loading=loading, ts=report.ts, threshold=threshold)
        model.health = verdict.state
        if report.latency_ms is not None:
            model.perf_hints["probe_latency_ms"] = report.latency_ms
        if verdict.changed:
            model.emit(HealthChanged(live=verdict.state.live, ready=verdict.state.ready,
                                     consecutive_failures=verdict.state.consecutive_failures))  # fmt: skip
        if model.state == "preloading" and preload_policy.ready_gate(
            probe_ok=report.ok, probe_pid=report.engine_pid, engine_pid=engine.pid
        ):
            self._healthy_while_loading(model, engine.pid, engine.pgid)
        elif model.state == "ready" and verdict.lost:
            failures = verdict.state.consecutive_failures
            model.fire("health_lost", cause=f"{failures} consecutive failed health probes")
        return model.outcome(None)

    def absorb_probe(self, pool: str, report: HealthReport) -> bool:
        """Fold a report that can change nothing but the probe bookkeeping, without a step.

        A 200 from the engine of a ready pool whose health is already live and ready is what
        :meth:`health` would fold into no event, no effect and no reply; all it keeps is the
        probe streak, the time and the latency (bookkeeping outside the state value). Any other
        report returns False having changed nothing, and is stepped as usual. The caller must
        only ask while no step of the pool is running or queued, so the order of inputs holds."""
        model = self.pools.get(pool)
        if model is None or not report.ok or model.value.state != "ready":
            return False
        engine = model.value.engine
        if engine is None or report.engine_pid != engine.pid:
            return False
        verdict = assess(model.health, ok=True, loading=False, ts=report.ts,
                         threshold=model.spec.probe_failure_threshold)  # fmt: skip
        if verdict.changed:
            return False
        model.health = verdict.state
        model.last_heartbeat = report.ts
        if report.latency_ms is not None:
            model.perf_hints["probe_latency_ms"] = report.latency_ms
        return True

    def _healthy_while_loading(self, model: PoolModel, pid: int, pgid: int) -> None:
        """The first healthy probe: ready at once, or first the check that the engine holds memory
        on its GPUs (the shell samples it and answers with ``GpuChecked``)."""
        check = model.definition.gpu_check
        placement = model.value.placement
        if check is None or placement is None or not placement.uuids:
            model.fire("engine_ready", reason="first healthy probe")
        elif model.verifying != pid:
            model.verifying = pid
            model.effects.append(VerifyGpus(pid, pgid, placement, check))

    def gpu_checked(self, pool: str, inp: GpuChecked, ctx: Context) -> Outcome:
        """The shell's final sample of the engine's GPU memory: ready, or a failed preload with the
        typed reason (``cpu_fallback``, ``wrong_devices``, ``under_budget``) recorded."""
        model = self.pool(pool)
        model.begin(ctx)
        engine = model.value.engine
        check = model.definition.gpu_check
        placement = model.value.placement
        if (model.state != "preloading" or engine is None or engine.pid != inp.pid or model.verifying != inp.pid
                or check is None or placement is None):  # fmt: skip
            return model.outcome(None)  # about an engine or a load this pool has moved past
        verdict = gpu_verify.judge(placement, inp.sample, check)
        if verdict.status == "pending":
            # Not final after all: the next healthy probe asks for another check.
            model.verifying = None
            return model.outcome(None)
        ok = verdict.status == "ok"
        model.emit(GpuVerified(ok=ok, reason=verdict.reason, message=verdict.message, pid=inp.pid,
                               pids=list(inp.sample.pids), held=dict(verdict.held), elapsed_s=inp.sample.elapsed_s,
                               deadline_s=check.deadline_s, min_fraction=check.min_fraction,
                               source=inp.source))  # fmt: skip
        model.verifying = None
        if ok:
            model.fire("engine_ready", reason=f"first healthy probe; GPUs verified: {verdict.message}")
        else:
            model.fire("preload_failed", cause=f"{verdict.reason}: {verdict.message}")
        return model.outcome(None)

    def timer_fired(self, pool: str, name: TimerName, token: int, ctx: Context) -> Outcome:
        """A timer armed by ``ArmTimer`` fired; stale tokens are ignored."""
        model = self.pool(pool)
        model.begin(ctx)
        if model.timers.get(name) != token:
            return model.outcome(None)
        del model.timers[name]
        if name == "load_timeout" and model.state == "preloading":
            model.fire("preload_failed", cause=preload_policy.timeout_reason(model.spec))
        elif name == "backoff" and model.state == "restarting":
            model.fire("backoff_elapsed")
        elif name == "drain_deadline" and model.state == "draining":
            outcome = drain_policy.at_deadline(reload=model.reloading, active_leases=model.value.active_leases,
                                               deadline_s=model.drain_deadline_s)  # fmt: skip
            model.fire("drain_deadline", reason=outcome.reason, leases_left=outcome.leases_left)
        elif name == "lease_expiry":
            model.drop_expired_leases()
        return model.outcome(None)

    def restore(self, pool: str, value: PoolValue, ctx: Context) -> Outcome:
        """Put a registered pool back where its event log left it (daemon recovery).

        ``value`` is the fold of the pool's events: the pool takes it as it is, since the fold
        evolved it exactly as this machine did. No event is emitted: the state is the log's. The
        effects re-arm what was pending: the rest of a load timeout, a drain deadline, a backoff,
        lease expiries. Reconciling with the engine processes found on the host is the shell's
        part (adopt, or report an exit)."""
        model = self.pool(pool)
        model.begin(ctx)
        if value.pool != pool:
            raise ValueError(f"the state of pool {value.pool!r} cannot restore pool {pool!r}")
        if value.spec is None:
            # The log never named a spec (nothing was preloaded yet): the configured one stands.
            configured = model.value
            value = msgspec.structs.replace(value, spec=configured.spec, mask=configured.mask,
                                            policy=configured.policy)  # fmt: skip
        model.value = model.prior = value
        remaining = max(0.0, (value.deadline_at or ctx.now) - ctx.now)
        if value.state == "preloading":
            model.arm("load_timeout", remaining)
        elif value.state == "draining":
            model.drain_deadline_s = remaining
            model.arm("drain_deadline", remaining)
        elif value.state == "restarting":
            model.arm("backoff", remaining)
        if value.leases:
            model.arm_lease_expiry()
        return model.outcome(None)

    def claim(self, pool: str, inp: ClaimInput, ctx: Context) -> Outcome:
        """This node holds the pool's ownership lease at ``inp.epoch``: record the claim. Taken
        from another node, the pool starts here with nothing running (see :class:`PoolClaimed`),
        and whatever that node's timers were waiting for is no concern of this one."""
        model = self.pool(pool)
        model.begin(ctx)
        previous = inp.previous_node
        if previous is not None and previous != self.node:
            model.cancel("load_timeout", "backoff", "drain_deadline", "lease_expiry")
        claim = PoolClaimed(node=self.node, epoch=inp.epoch, previous_node=previous,
                            previous_epoch=inp.previous_epoch, previous_state=model.state)  # fmt: skip
        model.pending_claim = None
        if model.value.seq == 0 and previous in (None, self.node):
            model.pending_claim = claim  # nothing to hand over: recorded with the first event
        else:
            model.emit(claim)
        return model.outcome(None)

    def release_ownership(self, pool: str, ctx: Context) -> Outcome:
        """This node gives the pool's lease up (a graceful stop): the last event of its epoch."""
        model = self.pool(pool)
        model.begin(ctx)
        if model.value.epoch:
            model.emit(PoolReleased(node=self.node, epoch=model.value.epoch))
        return model.outcome(None)

    def expire_leases(self, pool: str, ctx: Context) -> Outcome:
        """Drop expired leases now (also done by the ``lease_expiry`` timer)."""
        model = self.pool(pool)
        model.begin(ctx)
        model.drop_expired_leases()
        return model.outcome(None)


def internal_error_message(verb: str, pool: str) -> str:
    """The message of the ``internal`` rejection a command gets when its step raised."""
    return f"internal error while applying {verb!r} to pool {pool!r}; the pool is failed until it is reset"
