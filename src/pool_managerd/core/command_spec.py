"""The engine spec a preload or reload asks for, built only from what the configuration declares.

Nothing a client sends becomes an argv element other than as a value: a command may choose a
``model`` (one of the pool's ``models`` when it lists any) and values for the pool's declared
overrides, each checked against its type and bounds. The argv is always the configured template
with the declared flags of the chosen overrides appended. The machine (to record the spec) and
the shell (to preflight the binary and files that will really be used) both call
:func:`requested_spec`, so they can never disagree.
"""

from __future__ import annotations

import math

import msgspec

from pool_managerd.contract.messages import EngineSpec, LeaseCmd, OverrideValue, PoolCommand, PreloadCmd, ReloadCmd
from pool_managerd.core.definitions import OverrideDecl, PoolDefinition


class BadCommand(ValueError):
    """A command asked for something the pool's configuration does not allow."""


def check_override(decl: OverrideDecl, value: OverrideValue) -> OverrideValue:
    """``value`` as the declaration types it; raises :class:`BadCommand` naming the override."""
    where = f"override {decl.name!r}"
    if decl.kind == "bool":
        if not isinstance(value, bool):
            raise BadCommand(f"{where} takes true or false, not {value!r}")
        return value
    if decl.kind == "choice":
        if not isinstance(value, str) or value not in decl.choices:
            raise BadCommand(f"{where} must be one of {', '.join(decl.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadCommand(f"{where} takes a number")
    if decl.kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise BadCommand(f"{where} takes an integer, not {value!r}")
            value = int(value)
    elif not math.isfinite(value):
        raise BadCommand(f"{where} must be finite")
    if decl.min is not None and value < decl.min:
        raise BadCommand(f"{where} must be >= {decl.min:g}, not {value!r}")
    if decl.max is not None and value > decl.max:
        raise BadCommand(f"{where} must be <= {decl.max:g}, not {value!r}")
    return value


def check_overrides(definition: PoolDefinition, values: dict[str, OverrideValue]) -> dict[str, OverrideValue]:
    """Every value checked against the pool's declarations; an undeclared name is refused."""
    decls = {d.name: d for d in definition.overrides}
    checked: dict[str, OverrideValue] = {}
    for name, value in values.items():
        decl = decls.get(name)
        if decl is None:
            known = ", ".join(decls) or "none"
            raise BadCommand(f"pool {definition.pool!r} declares no override {name!r} (declared: {known})")
        checked[name] = check_override(decl, value)
    return checked


def override_args(definition: PoolDefinition, values: dict[str, OverrideValue]) -> list[str]:
    """The argv elements of checked override ``values``, in declaration order."""
    args: list[str] = []
    for decl in definition.overrides:
        if decl.name not in values:
            continue
        value = values[decl.name]
        if decl.kind == "bool":
            if value:
                args.append(decl.flag)
        else:
            args += [decl.flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def check_model(definition: PoolDefinition, model: str) -> None:
    """Refuse a model the pool's ``models`` list does not name (any well-formed one when empty;
    the wire type already bounds its length and refuses flags and ``..`` segments)."""
    allowed = definition.models
    if allowed and model not in allowed and model != definition.spec.model:
        raise BadCommand(f"pool {definition.pool!r} does not serve model {model!r} (allowed: {', '.join(allowed)})")


def check_command(definition: PoolDefinition, cmd: PoolCommand) -> None:
    """Raise :class:`BadCommand` when ``cmd`` asks for what the configuration does not allow."""
    if isinstance(cmd, PreloadCmd | ReloadCmd) and cmd.model is not None:
        check_model(definition, cmd.model)
    if isinstance(cmd, ReloadCmd) and cmd.overrides:
        check_overrides(definition, cmd.overrides)
    if isinstance(cmd, LeaseCmd) and cmd.ttl_s > definition.max_lease_ttl_s:
        limit = definition.max_lease_ttl_s
        raise BadCommand(f"lease ttl_s {cmd.ttl_s:g} exceeds pool {definition.pool!r}'s max_lease_ttl_s {limit:g}")


def requested_spec(definition: PoolDefinition, current: EngineSpec, cmd: PoolCommand) -> EngineSpec:
    """The spec ``cmd`` would run: ``current`` with the model it names and, for a reload, the
    configured argv template plus the flags of the override values (``cmd``'s merged over the
    ones ``current`` has). Any other command leaves ``current`` as it is. Raises
    :class:`BadCommand` for what the configuration does not allow."""
    if not isinstance(cmd, PreloadCmd | ReloadCmd):
        return current
    check_command(definition, cmd)
    spec = current
    if cmd.model is not None:
        spec = msgspec.structs.replace(spec, model=cmd.model)
    if isinstance(cmd, ReloadCmd) and cmd.overrides:
        values = {**spec.overrides, **check_overrides(definition, cmd.overrides)}
        argv = list(definition.spec.argv) + override_args(definition, values)
        spec = msgspec.structs.replace(spec, argv=argv, overrides=values)
    return spec
