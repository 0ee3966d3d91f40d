"""One pool command applied to one pool: the step behind :meth:`~pool_managerd.core.machine.
PoolMachine.command`.

A command fires the row its verb names (``preload``, ``drain``, ``reload``, ``stop``, ``reset``)
or changes the pool's leases without a row (``lease``, ``release``, ``ack_corrupt``); ``status``
reads the registry. Every refusal (illegal in this state, a lease rule, a bad field, a plan the
planner refused) becomes a typed ``Rejected`` reply and no event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import cast

from pool_managerd.contract.errors import IllegalTransition, LeaseRefused, UnknownLease
from pool_managerd.contract.messages import (
    Accepted,
    AckCorruptCmd,
    DrainCmd,
    LeaseCmd,
    LeaseGranted,
    LeaseReleased,
    LogCorruptAcknowledged,
    PoolCommand,
    PreloadCmd,
    Problem,
    RejectCode,
    Rejected,
    ReleaseCmd,
    ReloadCmd,
    StatusCmd,
    StatusReply,
    StopCmd,
    command_fingerprint,
)
from pool_managerd.core.command_spec import BadCommand, check_command, requested_spec
from pool_managerd.core.definitions import Context
from pool_managerd.core.pool_model import Outcome, PoolModel
from pool_managerd.core.registry import Registry
from pool_managerd.core.state import check_acquire, check_release
from pool_managerd.core.table import ALLOWED, client_verbs


def run_command(model: PoolModel, cmd: PoolCommand, ctx: Context, registry: Registry) -> Outcome:
    """Apply one pool command to ``model``. Never raises for bad requests: they become
    ``Rejected``; a ``status`` reads the pool's entry in ``registry``."""
    if ctx.command_id is None:
        ctx = replace(ctx, command_id=cmd.command_id)
    model.begin(ctx)
    verb = cmd.__struct_config__.tag
    assert isinstance(verb, str)
    if not isinstance(cmd, StatusCmd):
        # Every event from here to the pool's next command is caused by this one.
        model.step_cause = (ctx.command_id, ctx.traceparent)
        model.fingerprint = command_fingerprint(cmd)
    try:
        reply = _command(model, verb, cmd, registry)
    except IllegalTransition:
        verbs = client_verbs(model.state)
        message = (f"pool {model.pool_id!r}: {verb!r} is not allowed in state {model.state!r} "
                   f"(allowed: {', '.join(verbs)})")  # fmt: skip
        reply = _reject(model, verb, "illegal_transition", message, verbs)
    except LeaseRefused as exc:
        reply = _reject(model, verb, cast(RejectCode, exc.code), exc.message)
    except UnknownLease as exc:
        reply = _reject(model, verb, "unknown_lease", exc.message)
    except BadCommand as exc:
        reply = _reject(model, verb, "bad_request", str(exc))
    return model.outcome(reply)


def _command(model: PoolModel, verb: str, cmd: PoolCommand, registry: Registry) -> Accepted | Rejected | StatusReply:
    if isinstance(cmd, StatusCmd):
        return StatusReply(pool=registry.snapshot(model.pool_id))
    if isinstance(cmd, PreloadCmd):
        spec = model.spec
        if cmd.model is not None and "preload" in ALLOWED[model.state]:
            spec = requested_spec(model.definition, spec, cmd)
        # The recorded row carries the spec, mask and policy asked for: evolve takes them.
        taken = model.fire("preload", spec=spec, mask=cmd.device_mask, policy=cmd.policy)
        if not taken:
            return _plan_rejected(model, verb)
    elif isinstance(cmd, DrainCmd):
        model.fire("drain", deadline_s=cmd.deadline_s)
    elif isinstance(cmd, ReloadCmd):
        # Only what the configuration declares: the argv is always its template.
        new_spec = requested_spec(model.definition, model.spec, cmd)
        mask_same = cmd.device_mask is None or cmd.device_mask == model.mask
        policy_same = cmd.policy is None or cmd.policy == model.split_policy
        if new_spec == model.spec and mask_same and policy_same and model.state == "ready":
            # Reloading the very same spec is a no-op, not a needless restart.
            return _accept(model, verb, seq=model.value.seq)
        taken = model.fire(
            "reload", new_spec=new_spec, mask=cmd.device_mask, policy=cmd.policy, deadline_s=cmd.deadline_s
        )
        if not taken:
            return _plan_rejected(model, verb)
    elif isinstance(cmd, StopCmd):
        model.fire("stop", grace_s=cmd.grace_s, reason="stop command")
    elif verb == "reset":
        model.fire("reset", reason="reset command")
    elif isinstance(cmd, LeaseCmd):
        check_command(model.definition, cmd)
        held = model.value.leases
        if cmd.lease_id is not None:
            # Renewal: only the id the grant returned names a lease; a client never picks one.
            check_release(model.value, cmd.lease_id)
            lease_id, holder = cmd.lease_id, held[cmd.lease_id].holder
        else:
            lease_id, holder = model.ctx.new_lease_id or cmd.command_id, cmd.holder
            if lease_id in held:
                raise UnknownLease(f"pool {model.pool_id!r}: lease id {lease_id!r} is taken; retry")
        check_acquire(model.value, lease_id)
        expires_at = model.ctx.now + cmd.ttl_s
        active = len(held) + (0 if lease_id in held else 1)
        model.emit(LeaseGranted(lease_id=lease_id, expires_at=expires_at, active=active, holder=holder))
        model.arm_lease_expiry()
        first = model.events[0].seq
        return _accept(model, verb, seq=first, lease_id=lease_id, expires_at=expires_at)
    elif isinstance(cmd, AckCorruptCmd):
        # In any state: the shell checked the sequences against the quarantine it holds.
        model.emit(LogCorruptAcknowledged(sequences=sorted(set(cmd.sequences))))
    elif isinstance(cmd, ReleaseCmd):
        check_release(model.value, cmd.lease_id)
        model.emit(LeaseReleased(lease_id=cmd.lease_id, active=model.value.active_leases - 1))
        model.after_lease_drop()
    first_seq = model.events[0].seq if model.events else model.value.seq
    return _accept(model, verb, seq=first_seq)


def _accept(model: PoolModel, verb: str, *, seq: int, lease_id: str | None = None,
            expires_at: float | None = None) -> Accepted:  # fmt: skip
    return Accepted(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, seq=seq,
                    last_seq=model.value.seq, state=model.state, lease_id=lease_id,
                    expires_at=expires_at)  # fmt: skip


def _reject(model: PoolModel, verb: str, code: RejectCode, message: str,
            allowed: Iterable[str] = (), problems: Iterable[Problem] = ()) -> Rejected:  # fmt: skip
    # A refusal changes no state, so it is no event: the shell reports it (audit stream).
    return Rejected(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, code=code,
                    message=message, state=model.state, allowed=list(allowed), problems=list(problems))  # fmt: skip


def _plan_rejected(model: PoolModel, verb: str) -> Rejected:
    # The prepare callback kept the planner's refusal on the model for exactly this reply.
    rejected = model.last_plan_rejected
    code: RejectCode = rejected.code if rejected else "placement_failed"
    message = rejected.message if rejected else "placement failed"
    problems: list[Problem] = list(rejected.problems) if rejected else []
    return Rejected(command_id=model.ctx.command_id, pool=model.pool_id, verb=verb, code=code,
                    message=message, state=model.state, problems=problems)  # fmt: skip
