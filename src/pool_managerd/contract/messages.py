"""The wire contract: every message pool-managerd sends or accepts, as msgspec Structs.

This is the one module that defines wire shapes; ``schemas/`` is generated from it. Unions are
tagged on a ``type`` field. Every top-level message carries a schema version ``v``; events are
upcast on read (see ``pool_managerd.core.upcast``) when an older version is met.

Groups:

* GPU inventory (``GpuSnapshot`` and parts): what placement and preflight decide against.
* Placement: the recorded outcome of placing a pool on GPUs.
* Commands (``poold.cmd.<pool>.<verb>`` and ``poold.node.<node>.cmd.<verb>``) and their replies.
* Health reports (``poold.health.<pool>``).
* Events (``poold.evt.<pool>.<event>`` and ``poold.node.<node>.evt.<event>``) in an envelope.
* Pool snapshots (KV bucket ``poold_pools``).

One job, a long module: every wire shape lives here on purpose, so that ``schemas/`` is generated
from one place and a client author reads one file; splitting it by group would only move the
tagged unions (commands, replies, event bodies) away from the members they must list.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from pool_managerd.contract import limits

SCHEMA_VERSION = 1
"""Current schema version of every top-level message."""

MAX_PAYLOAD_BYTES = limits.MAX_PAYLOAD_BYTES
"""Largest command payload accepted; bigger ones are rejected with ``payload_too_large``
(every bound is in :mod:`pool_managerd.contract.limits`)."""

# msgspec matches patterns with re.search, where "$" also matches before a final newline.
Id = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}(?![\s\S])", max_length=63)]
NonNeg = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(ge=0)]
PositiveSeconds = Annotated[float, Meta(gt=0)]
CommandId = Annotated[str, Meta(min_length=1, max_length=limits.MAX_COMMAND_ID)]
LeaseId = Annotated[str, Meta(min_length=1, max_length=limits.MAX_LEASE_ID)]
Holder = Annotated[str, Meta(max_length=limits.MAX_HOLDER)]
# A model name or path: printable ASCII without spaces, never a flag ("-..."), no ".." segment.
Model = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=limits.MAX_MODEL,
        pattern=r"^(?!-)(?!(?:[\s\S]*/)?\.\.(?:/|(?![\s\S])))[!-~]+(?![\s\S])",
    ),
]
MaskToken = Annotated[str, Meta(max_length=limits.MAX_MASK_TOKEN)]
Mask = (
    Annotated[str, Meta(max_length=limits.MAX_MASK)]
    | Annotated[list[MaskToken], Meta(max_length=limits.MAX_MASK_ITEMS)]
)
Policy = Annotated[str, Meta(max_length=limits.MAX_POLICY)]
WaitSeconds = Annotated[float, Meta(ge=0, le=limits.MAX_WAIT_S)]
OverrideName = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}(?![\s\S])", max_length=limits.MAX_OVERRIDE_NAME)]
OverrideValue = int | float | bool | Annotated[str, Meta(max_length=limits.MAX_OVERRIDE_TEXT)]
Text = Annotated[str, Meta(max_length=limits.MAX_REASON)]

PoolState = Literal["unready", "preloading", "ready", "draining", "restarting", "failed"]


class _Base(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """Common base: keyword-only fields; unknown fields are ignored for forward compatibility
    (a reader of events, replies and snapshots skips what a newer writer added)."""


class _State(_Base, kw_only=True, omit_defaults=False):
    """Base of messages that tell a reader what is true now (status, KV snapshot, ``pools``,
    ``accepted``): every field is always written, ``null`` or ``0`` included, so an unready pool
    still says ``"state":"unready"`` and a fully leased one ``"slots_free":0``. The schemas list
    every field of these as required; the defaults only let older values still decode."""


# --------------------------------------------------------------------------------------------
# GPU inventory
# --------------------------------------------------------------------------------------------


class GpuProcess(_Base, kw_only=True):
    """A process holding memory on a GPU, as NVML reports it."""

    pid: int
    used_memory: NonNeg
    name: str | None = None


class MigInstance(_Base, kw_only=True):
    """One MIG GPU instance; it has its own ``MIG-...`` UUID and memory."""

    uuid: str
    parent_uuid: str
    index: NonNeg
    profile: str
    memory_total: NonNeg
    memory_free: NonNeg
    memory_used: NonNeg = 0


class Gpu(_Base, kw_only=True):
    """One physical GPU. Keyed by UUID everywhere: the NVML index is not the CUDA ordinal."""

    index: NonNeg
    uuid: str
    name: str
    pci_bus_id: str
    """Normalised to CUDA's form, ``dddd:bb:dd.f`` in lower case."""
    compute_capability: tuple[int, int]
    memory_total: NonNeg
    memory_free: NonNeg
    memory_used: NonNeg
    memory_reserved: NonNeg = 0
    """Driver-reserved memory (NVML v2); v1's ``used`` includes it."""
    mig_mode: bool = False
    mig_instances: list[MigInstance] = msgspec.field(default_factory=list)
    processes: list[GpuProcess] = msgspec.field(default_factory=list)
    healthy: bool = True
    """False after a device fault (Xid, double-bit ECC, off the bus) until an operator clears it:
    placement avoids it."""
    fault: str | None = None
    """What made it unhealthy, for a person (``Xid 79: GPU fell off the bus``)."""


class GpuSnapshot(_Base, kw_only=True):
    """The GPUs of one host at one instant. ``simulated`` marks inventories that are not real."""

    v: int = SCHEMA_VERSION
    simulated: bool
    source: str
    """``nvml``, ``sim:<profile>`` or the file it was read from."""
    taken_at: float = 0.0
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[Gpu] = msgspec.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Placement and preflight outcomes
# --------------------------------------------------------------------------------------------


class Problem(_Base, kw_only=True):
    """One reason a preload cannot go ahead (preflight) or a mask/plan is invalid."""

    code: str
    message: str
    device: str | None = None


class Placement(_Base, kw_only=True):
    """Where a pool's engine runs: the validated mask and the split plan chosen for it."""

    mask: list[str]
    """Canonical mask tokens, in mask order."""
    uuids: list[str]
    """Full GPU or MIG UUIDs in mask order: the engine's ordinals 0..n-1."""
    cuda_visible_devices: str
    budgets: list[NonNeg] = msgspec.field(default_factory=list)
    ratios: list[float] = msgspec.field(default_factory=list)
    policy: str = "none"
    tensor_split: str | None = None
    tp_size: int | None = None
    explanation: list[str] = msgspec.field(default_factory=list)
    simulated: bool = False


# --------------------------------------------------------------------------------------------
# Engine spec as it travels (a command can override the configured one)
# --------------------------------------------------------------------------------------------


class EngineSpec(_Base, kw_only=True):
    """A resolved engine spec: an argv template (never a shell string) and how to supervise it."""

    preset: str = "custom"
    argv: list[str]
    env: dict[str, str] = msgspec.field(default_factory=dict)
    model: str = ""
    model_digest: str | None = None
    health_path: str = "/health"
    host: str = "127.0.0.1"
    port: int | None = None
    load_timeout_s: PositiveSeconds = 120.0
    stop_grace_s: Seconds = 5.0
    probe_interval_s: PositiveSeconds = 2.0
    probe_failure_threshold: Annotated[int, Meta(ge=1)] = 3
    slots: Annotated[int, Meta(ge=1)] = 1
    min_compute_capability: tuple[int, int] | None = None
    engine_version: str | None = None
    overrides: dict[str, OverrideValue] = msgspec.field(default_factory=dict)
    """Values of the pool's declared overrides that a reload set; their flags are already in
    ``argv`` (appended to the configured template)."""


# --------------------------------------------------------------------------------------------
# Pool commands: poold.cmd.<pool>.<verb>
# --------------------------------------------------------------------------------------------


class _Command(_Base, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Base of pool commands. Unlike other messages, a command with a field this daemon does
    not know is refused (``bad_request`` naming the field): ignoring it would apply something
    other than what the client asked for (a removed ``argv``, a misspelt ``deadline_s``)."""

    command_id: CommandId
    v: int = SCHEMA_VERSION


class PreloadCmd(_Command, tag="preload", kw_only=True):
    """Start the pool's engine. ``device_mask`` and ``model`` override the configured ones
    (``model`` must be one of the pool's ``models`` when it lists any)."""

    device_mask: Mask | None = None
    model: Model | None = None
    policy: Policy | None = None


class DrainCmd(_Command, tag="drain", kw_only=True):
    """Refuse new leases and stop the engine once leases reach 0 or the deadline passes."""

    deadline_s: WaitSeconds = 30.0


class ReloadCmd(_Command, tag="reload", kw_only=True):
    """Drain, then start the engine again; on failure roll back to the old one.

    A reload chooses among what the configuration declares: a ``model`` (one of the pool's
    ``models`` when it lists any) and values for the pool's declared ``overrides``, each checked
    against its type and bounds. The argv is always the configured template."""

    model: Model | None = None
    device_mask: Mask | None = None
    policy: Policy | None = None
    overrides: Annotated[dict[OverrideName, OverrideValue], Meta(max_length=limits.MAX_OVERRIDES)] | None = None
    """Declared override → value; merged over the values the running spec has."""
    deadline_s: WaitSeconds = 30.0


class StopCmd(_Command, tag="stop", kw_only=True):
    """Stop the engine now: SIGTERM to its process group, SIGKILL after the grace period."""

    grace_s: WaitSeconds | None = None


class ResetCmd(_Command, tag="reset", kw_only=True):
    """Acknowledge a crash loop: ``failed`` → ``unready``."""


class LeaseCmd(_Command, tag="lease", kw_only=True):
    """Take one slot on a ready pool for ``ttl_s`` seconds (at most the pool's
    ``max_lease_ttl_s``). Without ``lease_id`` a new lease is granted and the reply carries its
    id, chosen by the daemon and unguessable; with the ``lease_id`` of a held lease it is
    renewed. Only that id renews or releases the lease."""

    ttl_s: Annotated[float, Meta(gt=0, le=limits.MAX_TTL_S)] = 60.0
    lease_id: LeaseId | None = None
    holder: Holder | None = None


class ReleaseCmd(_Command, tag="release", kw_only=True):
    """Give a leased slot back; ``lease_id`` is the one the grant returned."""

    lease_id: LeaseId


class StatusCmd(_Command, tag="status", kw_only=True):
    """Read the pool's snapshot. Never changes anything."""


MAX_ACK_SEQUENCES = 64
"""Most foreign stream sequences one ``ack_corrupt`` names (and one quarantine lists)."""


class AckCorruptCmd(_Command, tag="ack_corrupt", kw_only=True):
    """An operator has looked at the foreign messages of a quarantined (``log_corrupt``) pool:
    ``sequences`` must name exactly the stream sequences its ``status`` lists. Records
    ``log_corrupt_acknowledged``; replay and recovery skip those messages from then on."""

    sequences: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(min_length=1, max_length=MAX_ACK_SEQUENCES)]


PoolCommand = PreloadCmd | DrainCmd | ReloadCmd | StopCmd | ResetCmd | LeaseCmd | ReleaseCmd | StatusCmd | AckCorruptCmd

POOL_COMMANDS: dict[str, type[PoolCommand]] = {
    "preload": PreloadCmd,
    "drain": DrainCmd,
    "reload": ReloadCmd,
    "stop": StopCmd,
    "reset": ResetCmd,
    "lease": LeaseCmd,
    "release": ReleaseCmd,
    "status": StatusCmd,
    "ack_corrupt": AckCorruptCmd,
}
"""Verb → command type; the verb in the subject selects the type."""


# Node commands: poold.node.<node>.cmd.<verb>


class _NodeCommand(_Base, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    """Base of node commands; like pool commands, unknown fields are refused."""

    command_id: CommandId | None = None
    v: int = SCHEMA_VERSION


POOLS_PAGE_MAX = 200
"""Most pools in one ``pools`` reply (about 300 KB of snapshots, under NATS's default 1 MB max
payload); a reply is cut shorter still if its encoding would pass the server's max payload."""


class PoolsCmd(_NodeCommand, tag="pools", kw_only=True):
    """List the pools this node owns, with snapshots, one page at a time in pool id order."""

    after: Id | None = None
    """Start after this pool id: the previous page's ``next`` (None: from the first pool)."""
    limit: Annotated[int, Meta(ge=1, le=POOLS_PAGE_MAX)] = POOLS_PAGE_MAX
    """Most pools in this page."""


class InventoryCmd(_NodeCommand, tag="inventory", kw_only=True):
    """Return the node's current GPU snapshot."""


class LifecycleCmd(_NodeCommand, tag="lifecycle", kw_only=True):
    """Return the lifecycle table (states, transitions, triggers allowed per state)."""


GpuUuid = Annotated[str, Meta(pattern=r"^(GPU|MIG)-[0-9A-Za-z-]{1,80}(?![\s\S])", max_length=84)]


class GpuClearCmd(_NodeCommand, tag="gpu_clear", kw_only=True):
    """An operator says a device marked unhealthy by a fault may be placed on again."""

    uuid: GpuUuid


NodeCommand = PoolsCmd | InventoryCmd | LifecycleCmd | GpuClearCmd

NODE_COMMANDS: dict[str, type[NodeCommand]] = {
    "pools": PoolsCmd,
    "inventory": InventoryCmd,
    "lifecycle": LifecycleCmd,
    "gpu_clear": GpuClearCmd,
}


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------

RejectCode = Literal[
    "bad_request",
    "payload_too_large",
    "invalid_id",
    "unknown_pool",
    "unknown_verb",
    "illegal_transition",
    "preflight_failed",
    "placement_failed",
    "not_ready",
    "draining",
    "no_slots",
    "unknown_lease",
    "command_id_conflict",
    "fenced",
    "unavailable",
    "permission_denied",
    "internal",
    "overloaded",
    "log_corrupt",
    "ack_mismatch",
]
"""Stable rejection codes. Clients may switch on them; they never change meaning.
``permission_denied`` is a client's own answer: the NATS server refused to deliver the command
(the connection's user may not publish it), so no daemon saw it."""

REJECT_STATUS: dict[str, str] = {
    "bad_request": "400",
    "payload_too_large": "413",
    "invalid_id": "400",
    "unknown_pool": "404",
    "unknown_verb": "404",
    "illegal_transition": "409",
    "preflight_failed": "422",
    "placement_failed": "422",
    "not_ready": "409",
    "draining": "409",
    "no_slots": "409",
    "unknown_lease": "404",
    "command_id_conflict": "409",
    "fenced": "503",
    "unavailable": "503",
    "internal": "500",
    "overloaded": "429",
    "permission_denied": "403",
    "log_corrupt": "503",
    "ack_mismatch": "409",
}
"""The ``Nats-Service-Error-Code`` of each rejection code (nats micro error convention: an
HTTP-style status). The body keeps the precise ``code``; the header lets generic micro tooling
see an error. The daemon never sends ``permission_denied`` (a client answers it itself); its
status is listed so every code has one."""


class Accepted(_State, tag_field="type", tag="accepted", kw_only=True):
    """The command was applied. ``seq`` is the first pool event it produced and ``last_seq`` the
    last (a drain that completes at once writes two); both are the pool's current sequence when
    it produced none (a no-op reload)."""

    v: int = SCHEMA_VERSION
    command_id: str | None
    pool: str
    verb: str
    seq: NonNeg
    last_seq: NonNeg = 0
    state: PoolState
    lease_id: str | None = None
    expires_at: float | None = None


class Rejected(_Base, tag_field="type", tag="rejected", kw_only=True):
    """The command was not applied; nothing changed."""

    v: int = SCHEMA_VERSION
    command_id: str | None = None
    pool: str | None = None
    verb: str | None = None
    code: RejectCode
    message: str
    state: PoolState | None = None
    allowed: list[str] = msgspec.field(default_factory=list)
    problems: list[Problem] = msgspec.field(default_factory=list)


class LeaseInfo(_State, kw_only=True):
    """One active lease."""

    lease_id: str
    expires_at: float
    holder: str | None = None


class EngineInfo(_State, kw_only=True):
    """The engine process the pool currently runs."""

    pid: int
    pgid: int
    port: int
    started_at: float
    argv: list[str] = msgspec.field(default_factory=list)
    log_path: str | None = None


class ForeignMessage(_State, kw_only=True):
    """A message in a pool's event subjects that is not one of its events: undecodable, of
    another pool or type than its subject says, or out of the pool's sequence."""

    stream_seq: Annotated[int, Meta(ge=1)]
    subject: str
    size: NonNeg
    preview: str
    """At most 64 characters of the payload, non-printable characters escaped."""
    reason: str


class LogCorrupt(_State, kw_only=True):
    """A quarantined pool: foreign messages in its event stream wait for an operator's
    ``ack_corrupt``. The engine keeps running; commands that would append are refused."""

    sequences: list[int]
    reason: str
    messages: list[ForeignMessage] = msgspec.field(default_factory=list)


class PoolSnapshot(_State, kw_only=True):
    """A pool's current state and registry fields: the ``status`` reply and the KV value."""

    v: int = SCHEMA_VERSION
    pool: str
    node: str = ""
    state: PoolState = "unready"
    seq: NonNeg = 0
    health_live: bool = False
    health_ready: bool = False
    draining: bool = False
    last_error: str | None = None
    last_heartbeat: float | None = None
    version: str | None = None
    engine_version: str | None = None
    engine_digest: str | None = None
    model: str | None = None
    device_mask: list[str] = msgspec.field(default_factory=list)
    slots_total: NonNeg = 0
    slots_free: NonNeg = 0
    active_leases: NonNeg = 0
    leases: list[LeaseInfo] = msgspec.field(default_factory=list)
    perf_hints: dict[str, float] = msgspec.field(default_factory=dict)
    placement: Placement | None = None
    engine: EngineInfo | None = None
    restarts: NonNeg = 0
    crashes: NonNeg = 0
    simulated: bool = False
    updated_at: float = 0.0
    last_event: str | None = None
    vram_held: dict[str, NonNeg] = msgspec.field(default_factory=dict)
    """Bytes the engine's processes hold per GPU UUID, as read when it was verified after launch
    (empty until then, and when no engine runs)."""
    log_corrupt: LogCorrupt | None = None
    """Set while the pool is quarantined (``log_corrupt``), else null."""


class StatusReply(_State, tag_field="type", tag="status", kw_only=True):
    """Reply to ``status``."""

    v: int = SCHEMA_VERSION
    pool: PoolSnapshot


class PoolsReply(_State, tag_field="type", tag="pools", kw_only=True):
    """Reply to the node ``pools`` command: one page of the node's pools, in pool id order."""

    v: int = SCHEMA_VERSION
    node: str
    pools: list[PoolSnapshot]
    next: str | None = None
    """Ask again with ``after`` set to this for the next page; None: this is the last page."""
    total: NonNeg = 0
    """How many pools the node owns in all."""


class InventoryReply(_Base, tag_field="type", tag="inventory", kw_only=True):
    """Reply to the node ``inventory`` command."""

    v: int = SCHEMA_VERSION
    node: str
    gpus: GpuSnapshot


class GpuClearReply(_Base, tag_field="type", tag="gpu_clear", kw_only=True):
    """Reply to ``gpu_clear``: ``cleared`` is False when the device was not marked unhealthy."""

    v: int = SCHEMA_VERSION
    node: str
    uuid: str
    cleared: bool
    seq: int | None = None
    """The node event (``gpu_cleared``) that recorded it."""


class TransitionRow(_Base, kw_only=True):
    """One row of the lifecycle table."""

    trigger: str
    source: PoolState
    dest: PoolState
    kind: Literal["command", "fact", "timer"]
    note: str = ""


class LifecycleReply(_Base, tag_field="type", tag="lifecycle", kw_only=True):
    """Reply to the node ``lifecycle`` command: the table the machine runs."""

    v: int = SCHEMA_VERSION
    states: list[PoolState]
    initial: PoolState
    transitions: list[TransitionRow]
    allowed: dict[str, list[str]]


Reply = Accepted | Rejected | StatusReply | PoolsReply | InventoryReply | LifecycleReply | GpuClearReply


# --------------------------------------------------------------------------------------------
# Health reports: poold.health.<pool>
# --------------------------------------------------------------------------------------------


class HealthReport(_Base, tag_field="type", tag="health", kw_only=True):
    """One probe result. ``ok`` is HTTP 200; ``loading`` is llama.cpp's 503 while loading."""

    v: int = SCHEMA_VERSION
    pool: Id
    ts: Annotated[float, Meta(ge=0, le=limits.MAX_TIMESTAMP)]
    ok: bool
    loading: bool = False
    status: Annotated[int, Meta(ge=0, le=999)] | None = None
    latency_ms: Annotated[float, Meta(ge=0, le=1e9)] | None = None
    error: Text | None = None
    source: Annotated[str, Meta(max_length=limits.MAX_SOURCE)] = "prober"
    engine_pid: Annotated[int, Meta(ge=0, le=2**31)] | None = None
    """Which engine the probe hit; reports for an engine the pool no longer runs are ignored."""


# --------------------------------------------------------------------------------------------
# Events: poold.evt.<pool>.<event> in JetStream stream POOLD_EVENTS
# --------------------------------------------------------------------------------------------


class _EventBody(_Base, tag_field="type", kw_only=True):
    """Base of event bodies: the ``type`` tag is the event name used in the subject."""


class StateChanged(_EventBody, tag="state_changed", kw_only=True):
    """The pool moved along one row of the lifecycle table.

    The fields beyond trigger/src/dst record the decision inputs so a replay needs no GPU,
    clock or RNG: the placement chosen, the backoff delay, the exit code, the leases left.
    """

    trigger: str
    src: PoolState
    dst: PoolState
    reason: str = ""
    placement: Placement | None = None
    spec: EngineSpec | None = None
    delay_s: float | None = None
    deadline_at: float | None = None
    exit_code: int | None = None
    leases_left: int | None = None
    attempt: int | None = None
    reload: bool = False
    mask: str | list[str] | None = None
    """The device mask asked for on rows that place (``"auto"`` when none), so a restarted daemon
    keeps placing the way the pool was asked to be placed."""
    policy: str | None = None
    """The split policy asked for on rows that place."""
    crashed: bool = False
    """The row was taken because the engine exited on its own (an exit code, a signal, or an
    exit nobody could read), which the pool's crash counter counts."""


class PreloadRejected(_EventBody, tag="preload_rejected", kw_only=True):
    """A preload (or a restart's re-placement) failed preflight or placement. No longer written
    (refusals go to the audit stream); kept so that older logs still decode and replay."""

    code: RejectCode
    message: str
    problems: list[Problem] = msgspec.field(default_factory=list)


class CommandRejected(_EventBody, tag="command_rejected", kw_only=True):
    """A pool command was refused; the state did not change. No longer written (refusals go to
    the audit stream); kept so that older logs still decode and replay."""

    verb: str
    code: RejectCode
    message: str
    state: PoolState | None = None


class InternalError(_EventBody, tag="internal_error", kw_only=True):
    """A step of the pool raised: nothing it computed was kept, and the pool moves to ``failed``
    (an operator ``reset``s it). ``code`` is stable (``step_raised``); ``step`` names the input
    (a verb, ``health``, ``engine_exited``, a timer...); ``error`` is the exception's class name,
    never its text."""

    code: Literal["step_raised"] = "step_raised"
    step: str
    error: str


class EngineSpawned(_EventBody, tag="engine_spawned", kw_only=True):
    """An engine process was started."""

    pid: int
    pgid: int
    port: int
    argv: list[str]
    cuda_visible_devices: str
    log_path: str | None = None
    attempt: int = 0


class EngineExited(_EventBody, tag="engine_exited", kw_only=True):
    """An engine process ended. ``expected`` is True when we asked it to stop."""

    pid: int
    exit_code: int | None
    signal: int | None = None
    expected: bool = False
    during: PoolState | None = None


class EngineAdopted(_EventBody, tag="engine_adopted", kw_only=True):
    """After a daemon restart, a live engine from the spawn record was taken over."""

    pid: int
    pgid: int
    port: int


class BackoffScheduled(_EventBody, tag="backoff_scheduled", kw_only=True):
    """Supervision decided to restart after ``delay_s``."""

    delay_s: float
    attempt: int
    reason: str


class RestartLimitReached(_EventBody, tag="restart_limit_reached", kw_only=True):
    """Supervision parked the pool in ``failed``: too many restarts in the window."""

    restarts: int
    window_s: float
    reason: str


class LeaseGranted(_EventBody, tag="lease_granted", kw_only=True):
    lease_id: str
    expires_at: float
    active: NonNeg
    holder: str | None = None


class LeaseReleased(_EventBody, tag="lease_released", kw_only=True):
    lease_id: str
    active: NonNeg


class LeaseExpired(_EventBody, tag="lease_expired", kw_only=True):
    lease_id: str
    active: NonNeg


class DrainForced(_EventBody, tag="drain_forced", kw_only=True):
    """The drain deadline passed with leases still held; the engine was stopped anyway."""

    leases_left: NonNeg
    deadline_s: float


class ReloadRolledBack(_EventBody, tag="reload_rolled_back", kw_only=True):
    """The reloaded spec failed to become ready; the old spec is being restored."""

    reason: str


class HealthChanged(_EventBody, tag="health_changed", kw_only=True):
    """Liveness or readiness flipped (not every probe is an event, only changes)."""

    live: bool
    ready: bool
    consecutive_failures: NonNeg = 0


VerifyReason = Literal["cpu_fallback", "wrong_devices", "under_budget"]


class GpuVerified(_EventBody, tag="gpu_verified", kw_only=True):
    """The post-launch check of the engine's GPU memory: its verdict and the inputs it judged.

    ``held`` is what the engine's processes (``pids``) held per GPU UUID in the sample judged,
    ``elapsed_s`` how long after its first healthy probe; with the placement (in the pool's
    ``state_changed``) and ``deadline_s``/``min_fraction`` a replay re-judges it without a GPU.
    ``ok`` False: ``reason`` says why and the preload fails."""

    ok: bool
    reason: VerifyReason | None = None
    message: str = ""
    pid: int
    pids: list[int] = msgspec.field(default_factory=list)
    held: dict[str, NonNeg] = msgspec.field(default_factory=dict)
    elapsed_s: float = 0.0
    deadline_s: float = 0.0
    min_fraction: float = 0.0
    source: str = ""
    """Where the memory was read: ``nvml``, ``sim:<profile>``..."""


class PoolFenced(_EventBody, tag="pool_fenced", kw_only=True):
    """Another writer owns this pool's event subject; this daemon stops acting on it."""

    reason: str
    pool: str | None = None


Epoch = Annotated[int, Meta(ge=0, le=2**53)]
"""A pool's ownership epoch: the fencing token its owner's events carry (0: no lease, old logs)."""


class PoolClaimed(_EventBody, tag="pool_claimed", kw_only=True):
    """``node`` holds the pool's ownership lease at ``epoch`` from here on (a claim is the first
    event of every epoch). ``previous_node``/``previous_epoch`` name the holder it took over from;
    when that was another node, whatever that node ran (its engine, its client leases) is its
    own to stop: this node starts with no engine and the pool ``unready``, and ``previous_state``
    says what the pool was doing there."""

    node: Id
    epoch: Epoch
    previous_node: Id | None = None
    previous_epoch: Epoch = 0
    previous_state: PoolState | None = None


class PoolReleased(_EventBody, tag="pool_released", kw_only=True):
    """``node`` gave up the lease of ``epoch`` (a graceful stop): anyone may claim it at once."""

    node: Id
    epoch: Epoch


class LogCorruptAcknowledged(_EventBody, tag="log_corrupt_acknowledged", kw_only=True):
    """An operator acknowledged the foreign messages at these stream sequences of the pool's
    event subjects: replay and recovery skip exactly them, and the pool serves again."""

    sequences: list[int]


class OrphanReaped(_EventBody, tag="orphan_reaped", kw_only=True):
    """An engine process group from the spawn record that no pool claims was stopped."""

    pid: int
    pgid: int
    pool: str | None = None


class DaemonStarted(_EventBody, tag="daemon_started", kw_only=True):
    version: str
    pools: list[str]
    simulated: bool


class DaemonStopping(_EventBody, tag="daemon_stopping", kw_only=True):
    reason: str


FaultKindName = Literal["xid", "ecc_dbe", "fell_off_bus", "handle_lost"]
FaultClassName = Literal["application", "drain", "stop"]


class GpuFault(_EventBody, tag="gpu_fault", kw_only=True):
    """A critical GPU event (node event): the device, what happened, and what the daemon did.

    ``fault_class`` ``application`` leaves the device healthy; ``drain`` and ``stop`` mark it
    unhealthy (placement avoids it) and drain or stop the ``pools`` placed on it."""

    uuid: str
    kind: FaultKindName
    xid: int | None = None
    fault_class: FaultClassName
    action: Literal["none", "drain", "stop"]
    unhealthy: bool
    description: str = ""
    pools: list[str] = msgspec.field(default_factory=list)
    simulated: bool = False


class GpuCleared(_EventBody, tag="gpu_cleared", kw_only=True):
    """An operator cleared an unhealthy device (node event): placement may use it again."""

    uuid: str
    fault: str | None = None


class NodeHeartbeat(_EventBody, tag="heartbeat", kw_only=True):
    """Every 10 s: the node is alive; a GPU summary and how many pools are in each state.

    A summary, not a list: its size does not grow with the pool count (each pool's state is in
    its own events and KV snapshot)."""

    gpus: int
    memory_total: NonNeg
    memory_free: NonNeg
    simulated: bool
    pools: dict[str, str] = msgspec.field(default_factory=dict)
    """No longer filled (it listed every pool and its state); kept so older beats still decode."""
    states: dict[str, NonNeg] = msgspec.field(default_factory=dict)
    """How many pools this node serves in each lifecycle state."""
    period_s: float | None = None
    """How often this node beats: others judge its silence by its own period, not theirs."""


EventBody = (
    StateChanged
    | PreloadRejected
    | CommandRejected
    | InternalError
    | EngineSpawned
    | EngineExited
    | EngineAdopted
    | BackoffScheduled
    | RestartLimitReached
    | LeaseGranted
    | LeaseReleased
    | LeaseExpired
    | DrainForced
    | ReloadRolledBack
    | HealthChanged
    | GpuVerified
    | PoolFenced
    | PoolClaimed
    | PoolReleased
    | LogCorruptAcknowledged
    | OrphanReaped
    | DaemonStarted
    | DaemonStopping
    | GpuFault
    | GpuCleared
    | NodeHeartbeat
)


class Event(_Base, kw_only=True):
    """The envelope of every event. ``pool`` events have a contiguous per-pool ``seq`` from 1;
    node events have ``pool`` None and a per-node sequence. ``v`` is always written so that
    readers can upcast older events."""

    v: int
    seq: Annotated[int, Meta(ge=1)]
    ts: float
    node: str
    pool: str | None = None
    command_id: str | None = None
    """The command that caused the event: set on the command's own events and on every event
    the pool writes after it (engine spawned, ready, ...) until the pool's next command."""
    traceparent: str | None = None
    """The W3C trace context of that command, on the same events as ``command_id``."""
    fingerprint: str | None = None
    """Set only on the events of the command's own step: ``<verb>:<hash>`` of the decoded
    command (see :func:`command_fingerprint`). Recovery rebuilds the command's reply from them."""
    epoch: Epoch | None = None
    """The ownership epoch of the writer's lease (pool events; absent in logs from before leases).
    Replay checks it against the pool's claims: a write under an epoch its writer does not hold
    is a ``two_writers`` violation."""
    body: EventBody

    @property
    def type(self) -> str:
        """The event name: the tag of its body (``state_changed``, ``engine_exited``, ...)."""
        return str(self.body.__struct_config__.tag)


class OwnerRecord(_Base, kw_only=True):
    """A pool's ownership lease: the value of key ``<prefix>.<pool>`` in KV bucket ``poold_owners``.

    Written only with compare-and-set on the key's revision: a claim creates it or updates the
    revision it read, a renewal updates the revision it wrote. ``renewed_at`` (the owner's wall
    clock) and ``ttl_s`` are for people; nodes judge expiry by their own monotonic clock from
    when they saw the revision change (see ``pool_managerd.core.ownership``)."""

    v: int = SCHEMA_VERSION
    node: Id
    epoch: Annotated[int, Meta(ge=1, le=2**53)]
    ttl_s: PositiveSeconds
    renewed_at: float = 0.0
    released: bool = False


class AuditRecord(_Base, tag_field="type", tag="command_refused", kw_only=True):
    """One refused command, on ``<prefix>.audit.<node>.<code>`` in the size-bounded stream
    ``POOLD_AUDIT`` (never in the pool's event stream: a refusal changes no state)."""

    v: int = SCHEMA_VERSION
    ts: float
    node: str
    pool: str | None = None
    verb: str | None = None
    command_id: str | None = None
    code: RejectCode
    message: Annotated[str, Meta(max_length=512)]
    state: PoolState | None = None


# --------------------------------------------------------------------------------------------
# Encoding helpers shared by every layer
# --------------------------------------------------------------------------------------------

_canonical_encoder = msgspec.json.Encoder(order="sorted")


def command_fingerprint(cmd: Struct) -> str:
    """What makes two commands "the same" for an idempotent retry: ``<verb>:<hash>`` over the
    decoded command with every field present (defaults filled in) and keys sorted.

    So key order, whitespace, number spelling (``30`` and ``30.0``) and a field written out at its
    default value make no difference; the verb and every field's decoded value do. Headers
    (``traceparent``) are not part of the command."""
    verb = str(cmd.__struct_config__.tag)
    fields = msgspec.structs.asdict(cmd)
    digest = hashlib.blake2b(_canonical_encoder.encode(fields), digest_size=12).hexdigest()
    return f"{verb}:{digest}"


_json_encoder = msgspec.json.Encoder()


def encode(msg: Struct) -> bytes:
    """Encode any wire message as JSON bytes."""
    return _json_encoder.encode(msg)


EVENT_DECODER: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
REPLY_DECODER: msgspec.json.Decoder[Reply] = msgspec.json.Decoder(Reply)
HEALTH_DECODER: msgspec.json.Decoder[HealthReport] = msgspec.json.Decoder(HealthReport)
SNAPSHOT_DECODER: msgspec.json.Decoder[PoolSnapshot] = msgspec.json.Decoder(PoolSnapshot)
OWNER_DECODER: msgspec.json.Decoder[OwnerRecord] = msgspec.json.Decoder(OwnerRecord)
GPU_SNAPSHOT_DECODER: msgspec.json.Decoder[GpuSnapshot] = msgspec.json.Decoder(GpuSnapshot)

ALL_MESSAGES: dict[str, type[Struct]] = {
    **{f"cmd.{verb}": cls for verb, cls in POOL_COMMANDS.items()},
    **{f"node_cmd.{verb}": cls for verb, cls in NODE_COMMANDS.items()},
    "reply.accepted": Accepted,
    "reply.rejected": Rejected,
    "reply.status": StatusReply,
    "reply.pools": PoolsReply,
    "reply.inventory": InventoryReply,
    "reply.gpu_clear": GpuClearReply,
    "reply.lifecycle": LifecycleReply,
    "health": HealthReport,
    "event": Event,
    "pool_snapshot": PoolSnapshot,
    "gpu_snapshot": GpuSnapshot,
    "audit_record": AuditRecord,
}
"""Every top-level message by schema name; ``pool-managerd schemas`` writes one file each."""
