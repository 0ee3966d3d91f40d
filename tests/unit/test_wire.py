"""The wire layer: every message round-trips, malformed bytes are refused, ids cannot inject subjects."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pool_managerd.contract.errors import InvalidId, InvalidSubject
from pool_managerd.contract.messages import (
    ALL_MESSAGES,
    EVENT_DECODER,
    GPU_SNAPSHOT_DECODER,
    HEALTH_DECODER,
    NODE_COMMANDS,
    POOL_COMMANDS,
    REPLY_DECODER,
    SCHEMA_VERSION,
    SNAPSHOT_DECODER,
    Accepted,
    AckCorruptCmd,
    AuditRecord,
    BackoffScheduled,
    CommandRejected,
    DaemonStarted,
    DaemonStopping,
    DrainCmd,
    DrainForced,
    EngineAdopted,
    EngineExited,
    EngineInfo,
    EngineSpawned,
    EngineSpec,
    Event,
    EventBody,
    Gpu,
    GpuClearCmd,
    GpuCleared,
    GpuClearReply,
    GpuFault,
    GpuProcess,
    GpuSnapshot,
    GpuVerified,
    HealthChanged,
    HealthReport,
    InternalError,
    InventoryCmd,
    InventoryReply,
    LeaseCmd,
    LeaseExpired,
    LeaseGranted,
    LeaseInfo,
    LeaseReleased,
    LifecycleCmd,
    LogCorruptAcknowledged,
    MigInstance,
    NodeHeartbeat,
    OrphanReaped,
    Placement,
    PoolClaimed,
    PoolFenced,
    PoolReleased,
    PoolsCmd,
    PoolSnapshot,
    PoolsReply,
    PreloadCmd,
    PreloadRejected,
    Problem,
    Rejected,
    ReleaseCmd,
    ReloadCmd,
    ReloadRolledBack,
    ResetCmd,
    RestartLimitReached,
    StateChanged,
    StatusCmd,
    StatusReply,
    StopCmd,
    encode,
)
from pool_managerd.contract.subjects import ID_RE, Subjects, msg_id, validate_id
from pool_managerd.core.table import describe

# --- examples -----------------------------------------------------------------------------------

PLACEMENT = Placement(
    mask=["0", "1"],
    uuids=["GPU-aaaa", "GPU-bbbb"],
    cuda_visible_devices="GPU-aaaa,GPU-bbbb",
    budgets=[10, 20],
    ratios=[0.25, 0.75],
    policy="proportional",
    tensor_split="1,3",
    tp_size=2,
    explanation=["GPU 0 has less free memory"],
    simulated=True,
)
SPEC = EngineSpec(
    preset="llama.cpp",
    argv=["llama-server", "-m", "{model}", "--port", "{port}"],
    env={"A": "1"},
    model="/models/m.gguf",
    model_digest="sha256:00",
    port=8080,
    load_timeout_s=60.0,
    slots=4,
    min_compute_capability=(8, 0),
    engine_version="b1234",
)
GPU_SNAPSHOT = GpuSnapshot(
    simulated=True,
    source="sim:h200-x1",
    taken_at=12.5,
    driver_version="580.159.04",
    cuda_driver_version="13.0",
    gpus=[
        Gpu(
            index=0,
            uuid="GPU-aaaa",
            name="NVIDIA H200",
            pci_bus_id="0000:00:06.0",
            compute_capability=(9, 0),
            memory_total=150_000,
            memory_free=140_000,
            memory_used=10_000,
            memory_reserved=615,
            mig_mode=True,
            mig_instances=[
                MigInstance(
                    uuid="MIG-1",
                    parent_uuid="GPU-aaaa",
                    index=0,
                    profile="1g.18gb",
                    memory_total=18,
                    memory_free=17,
                    memory_used=1,
                )
            ],
            processes=[GpuProcess(pid=42, used_memory=4_840, name="python")],
        )
    ],
)
SNAPSHOT = PoolSnapshot(
    pool="chat-8b",
    node="node-1",
    state="ready",
    seq=7,
    health_live=True,
    health_ready=True,
    last_error="boom",
    last_heartbeat=3.5,
    model="/models/m.gguf",
    device_mask=["0", "1"],
    slots_total=4,
    slots_free=3,
    active_leases=1,
    leases=[LeaseInfo(lease_id="l1", expires_at=99.0, holder="svc")],
    perf_hints={"probe_latency_ms": 1.5},
    placement=PLACEMENT,
    engine=EngineInfo(pid=10, pgid=10, port=8080, started_at=1.0, argv=["x"], log_path="/tmp/p.log"),
    restarts=2,
    crashes=1,
    simulated=True,
    updated_at=4.0,
    last_event="state_changed",
)

BODIES: dict[str, Any] = {
    "state_changed": StateChanged(
        trigger="preload",
        src="unready",
        dst="preloading",
        reason="r",
        placement=PLACEMENT,
        spec=SPEC,
        delay_s=1.0,
        deadline_at=5.0,
        exit_code=1,
        leases_left=0,
        attempt=2,
        reload=True,
    ),
    "preload_rejected": PreloadRejected(
        code="preflight_failed", message="no GPU", problems=[Problem(code="no_gpu", message="none", device="0")]
    ),
    "command_rejected": CommandRejected(verb="drain", code="illegal_transition", message="m", state="unready"),
    "internal_error": InternalError(step="preload", error="AttributeError"),
    "engine_spawned": EngineSpawned(
        pid=1, pgid=1, port=2, argv=["a"], cuda_visible_devices="GPU-aaaa", log_path="/l", attempt=3
    ),
    "engine_exited": EngineExited(pid=1, exit_code=None, signal=9, expected=True, during="ready"),
    "engine_adopted": EngineAdopted(pid=1, pgid=1, port=2),
    "backoff_scheduled": BackoffScheduled(delay_s=2.0, attempt=2, reason="crash"),
    "restart_limit_reached": RestartLimitReached(restarts=10, window_s=60.0, reason="too many"),
    "lease_granted": LeaseGranted(lease_id="l", expires_at=10.0, active=1, holder="h"),
    "lease_released": LeaseReleased(lease_id="l", active=0),
    "lease_expired": LeaseExpired(lease_id="l", active=0),
    "drain_forced": DrainForced(leases_left=1, deadline_s=30.0),
    "reload_rolled_back": ReloadRolledBack(reason="new engine crashed"),
    "health_changed": HealthChanged(live=True, ready=False, consecutive_failures=2),
    "pool_fenced": PoolFenced(reason="10071"),
    "pool_claimed": PoolClaimed(
        node="node-b", epoch=4, previous_node="node-a", previous_epoch=3, previous_state="ready"
    ),
    "pool_released": PoolReleased(node="node-b", epoch=4),
    "log_corrupt_acknowledged": LogCorruptAcknowledged(sequences=[7, 9]),
    "orphan_reaped": OrphanReaped(pid=5, pgid=5, pool="p"),
    "daemon_started": DaemonStarted(version="0.1.0", pools=["a", "b"], simulated=True),
    "daemon_stopping": DaemonStopping(reason="SIGTERM"),
    "heartbeat": NodeHeartbeat(gpus=1, memory_total=10, memory_free=5, simulated=True, states={"ready": 1}),
    "gpu_verified": GpuVerified(
        ok=False,
        reason="cpu_fallback",
        message="m",
        pid=7,
        pids=[7, 8],
        held={"GPU-aaaa": 1},
        elapsed_s=1.5,
        deadline_s=1.0,
        min_fraction=0.5,
        source="nvml",
    ),
    "gpu_fault": GpuFault(
        uuid="GPU-aaaa",
        kind="xid",
        xid=79,
        fault_class="stop",
        action="stop",
        unhealthy=True,
        description="Xid 79: GPU fell off the bus",
        pools=["chat-8b"],
        simulated=True,
    ),
    "gpu_cleared": GpuCleared(uuid="GPU-aaaa", fault="Xid 79: GPU fell off the bus"),
}


def event(body: Any, seq: int = 1) -> Event:
    return Event(
        v=SCHEMA_VERSION,
        seq=seq,
        ts=1.5,
        node="node-1",
        pool="chat-8b",
        command_id="cmd-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        body=body,
    )


EXAMPLES: dict[str, msgspec.Struct] = {
    "cmd.preload": PreloadCmd(command_id="c1", device_mask=["0", "1"], model="m", policy="proportional"),
    "cmd.drain": DrainCmd(command_id="c2", deadline_s=5.0),
    "cmd.reload": ReloadCmd(
        command_id="c3", model="m2", device_mask="0,1", overrides={"ctx_size": 4096}, deadline_s=1.0
    ),
    "cmd.stop": StopCmd(command_id="c4", grace_s=2.0),
    "cmd.reset": ResetCmd(command_id="c5"),
    "cmd.lease": LeaseCmd(command_id="c6", ttl_s=5.0, lease_id="l1", holder="svc"),
    "cmd.release": ReleaseCmd(command_id="c7", lease_id="l1"),
    "cmd.status": StatusCmd(command_id="c8"),
    "cmd.ack_corrupt": AckCorruptCmd(command_id="c9", sequences=[7]),
    "node_cmd.pools": PoolsCmd(command_id="n1"),
    "node_cmd.inventory": InventoryCmd(),
    "node_cmd.lifecycle": LifecycleCmd(command_id="n3"),
    "node_cmd.gpu_clear": GpuClearCmd(command_id="n4", uuid="GPU-aaaa"),
    "reply.accepted": Accepted(
        command_id="c6", pool="chat-8b", verb="lease", seq=3, state="ready", lease_id="l1", expires_at=9.0
    ),
    "reply.rejected": Rejected(
        command_id="c1",
        pool="chat-8b",
        verb="preload",
        code="preflight_failed",
        message="no usable GPU",
        state="unready",
        allowed=["preload"],
        problems=[Problem(code="no_gpu", message="none")],
    ),
    "reply.status": StatusReply(pool=SNAPSHOT),
    "reply.pools": PoolsReply(node="node-1", pools=[SNAPSHOT, PoolSnapshot(pool="other")]),
    "reply.inventory": InventoryReply(node="node-1", gpus=GPU_SNAPSHOT),
    "reply.lifecycle": describe(),
    "reply.gpu_clear": GpuClearReply(node="node-1", uuid="GPU-aaaa", cleared=True, seq=4),
    "health": HealthReport(
        pool="chat-8b",
        ts=2.0,
        ok=False,
        loading=True,
        status=503,
        latency_ms=0.8,
        error="Loading model",
        engine_pid=10,
    ),
    "event": event(BODIES["state_changed"]),
    "pool_snapshot": SNAPSHOT,
    "gpu_snapshot": GPU_SNAPSHOT,
    "audit_record": AuditRecord(
        ts=3.0,
        node="node-1",
        pool="chat-8b",
        verb="drain",
        command_id="c2",
        code="illegal_transition",
        message="not now",
        state="unready",
    ),
}

DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "event": EVENT_DECODER,
    "reply": REPLY_DECODER,
    "health": HEALTH_DECODER,
    "snapshot": SNAPSHOT_DECODER,
    "gpu_snapshot": GPU_SNAPSHOT_DECODER,
}


# --- round trips ---------------------------------------------------------------------------------


def test_every_message_has_an_example() -> None:
    assert set(EXAMPLES) == set(ALL_MESSAGES)
    for name, example in EXAMPLES.items():
        assert type(example) is ALL_MESSAGES[name], name


@pytest.mark.parametrize("name", sorted(ALL_MESSAGES))
def test_round_trip_every_message(name: str) -> None:
    example = EXAMPLES[name]
    data = encode(example)
    assert msgspec.json.decode(data, type=ALL_MESSAGES[name]) == example
    # encode is deterministic
    assert encode(msgspec.json.decode(data, type=ALL_MESSAGES[name])) == data


@pytest.mark.parametrize("name", sorted(n for n in ALL_MESSAGES if n.startswith("reply.")))
def test_replies_round_trip_through_the_tagged_union_decoder(name: str) -> None:
    assert REPLY_DECODER.decode(encode(EXAMPLES[name])) == EXAMPLES[name]


def test_named_decoders_round_trip() -> None:
    assert HEALTH_DECODER.decode(encode(EXAMPLES["health"])) == EXAMPLES["health"]
    assert SNAPSHOT_DECODER.decode(encode(SNAPSHOT)) == SNAPSHOT
    assert GPU_SNAPSHOT_DECODER.decode(encode(GPU_SNAPSHOT)) == GPU_SNAPSHOT


def test_every_event_body_has_an_example() -> None:
    tags = {cls.__struct_config__.tag for cls in typing.get_args(EventBody)}
    assert set(BODIES) == tags


@pytest.mark.parametrize("tag", sorted(BODIES))
def test_every_event_body_round_trips_in_the_envelope(tag: str) -> None:
    original = event(BODIES[tag], seq=5)
    data = encode(original)
    decoded = EVENT_DECODER.decode(data)
    assert decoded == original
    assert decoded.type == tag
    assert f'"type":"{tag}"'.encode() in data


def test_defaults_are_omitted_but_the_tag_is_written() -> None:
    data = encode(DrainCmd(command_id="x"))
    assert msgspec.json.decode(data) == {"type": "drain", "command_id": "x"}


def test_readers_ignore_unknown_fields_for_forward_compatibility() -> None:
    # Events, replies and snapshots: a reader skips what a newer writer added.
    event = msgspec.json.decode(
        b'{"v":1,"seq":1,"ts":1,"node":"n","from_the_future":[1],"body":{"type":"daemon_stopping","reason":"r","x":2}}',
        type=Event,
    )
    assert event.body == DaemonStopping(reason="r")
    assert msgspec.json.decode(b'{"pool":"p","from_the_future":1}', type=PoolSnapshot).pool == "p"


@pytest.mark.parametrize("cls", [*POOL_COMMANDS.values(), *NODE_COMMANDS.values()])
def test_commands_refuse_unknown_fields_naming_them(cls: type[msgspec.Struct]) -> None:
    # A command applied without a field its sender meant (a removed argv, a misspelt deadline)
    # would do something else than asked: it is refused instead, and the error names the field.
    with pytest.raises(msgspec.ValidationError, match="unknown field `from_the_future`"):
        msgspec.json.decode(b'{"command_id":"x","from_the_future":[1,2]}', type=cls)


# --- commands by verb -----------------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(set(POOL_COMMANDS) - {"release", "ack_corrupt"}))
def test_minimal_command_decodes_by_verb(verb: str) -> None:
    cmd = msgspec.json.decode(b'{"command_id":"x"}', type=POOL_COMMANDS[verb])
    assert type(cmd) is POOL_COMMANDS[verb]
    assert cmd.command_id == "x"
    assert cmd.v == SCHEMA_VERSION
    assert cmd.__struct_config__.tag == verb


def test_drain_defaults() -> None:
    cmd = msgspec.json.decode(b'{"command_id":"x"}', type=POOL_COMMANDS["drain"])
    assert cmd == DrainCmd(command_id="x", deadline_s=30.0)


def test_release_needs_a_lease_id() -> None:
    with pytest.raises(msgspec.ValidationError, match="lease_id"):
        msgspec.json.decode(b'{"command_id":"x"}', type=POOL_COMMANDS["release"])
    assert msgspec.json.decode(b'{"command_id":"x","lease_id":"l"}', type=ReleaseCmd).lease_id == "l"


@pytest.mark.parametrize("verb", sorted(set(NODE_COMMANDS) - {"gpu_clear"}))
def test_node_commands_need_no_fields(verb: str) -> None:
    cmd = msgspec.json.decode(b"{}", type=NODE_COMMANDS[verb])
    assert cmd.command_id is None
    assert cmd.__struct_config__.tag == verb


@pytest.mark.parametrize(
    "payload",
    [b"{}", b'{"uuid":""}', b'{"uuid":"GPU/etc"}', b'{"uuid":"GPU-a b"}', b'{"uuid":"GPU-' + b"a" * 90 + b'"}',
     b'{"uuid":"GPU-aaaa\\n"}', b'{"uuid":7}'],
)  # fmt: skip
def test_gpu_clear_takes_only_a_bounded_gpu_uuid(payload: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(payload, type=NODE_COMMANDS["gpu_clear"])
    ok = msgspec.json.decode(b'{"uuid":"GPU-4090c0de-0000-4000-8000-000000000024"}', type=NODE_COMMANDS["gpu_clear"])
    assert ok.__struct_config__.tag == "gpu_clear"


@pytest.mark.parametrize(
    ("verb", "payload", "where"),
    [
        ("drain", b'{"command_id":"x","deadline_s":"soon"}', "deadline_s"),
        ("drain", b'{"command_id":"x","deadline_s":-1}', "deadline_s"),
        ("drain", b'{"command_id":"x","type":"stop"}', "type"),
        ("drain", b'{"command_id":5}', "command_id"),
        ("drain", b'{"command_id":""}', "command_id"),
        ("drain", b'{"command_id":"' + b"x" * 129 + b'"}', "command_id"),
        ("drain", b"{}", "command_id"),
        ("drain", b'{"command_id":"x","v":"one"}', "v"),
        ("stop", b'{"command_id":"x","grace_s":-0.5}', "grace_s"),
        ("lease", b'{"command_id":"x","ttl_s":0}', "ttl_s"),
        ("lease", b'{"command_id":"x","lease_id":""}', "lease_id"),
        ("preload", b'{"command_id":"x","device_mask":5}', "device_mask"),
        ("preload", b'{"command_id":"x","device_mask":[0,1]}', "device_mask"),
        ("reload", b'{"command_id":"x","argv":"llama-server -m x"}', "argv"),
        ("release", b'{"command_id":"x","lease_id":7}', "lease_id"),
        ("status", b'["command_id","x"]', "object"),
    ],
)
def test_bad_command_fields_are_validation_errors(verb: str, payload: bytes, where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(payload, type=POOL_COMMANDS[verb])
    assert where in str(info.value)


# --- malformed bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("data", [b"", b"{", b"not json", b'{"a":1', b"\xff\xfe", b'{"v":1,}'])
def test_malformed_bytes_are_decode_errors(decoder: str, data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        DECODERS[decoder].decode(data)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("data", [b"null", b"[]", b"1", b'"text"', b'{"v":1}', b'{"type":"nope"}'])
def test_wrong_shapes_are_validation_errors(decoder: str, data: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        DECODERS[decoder].decode(data)


def _event_dict(**changes: Any) -> bytes:
    raw = msgspec.json.decode(encode(event(BODIES["lease_released"])))
    raw.update(changes)
    return msgspec.json.encode(raw)


@pytest.mark.parametrize(
    "data",
    [
        _event_dict(seq=0),
        _event_dict(seq="1"),
        _event_dict(body={"type": "no_such_event"}),
        _event_dict(body={"type": "lease_released", "lease_id": "l", "active": -1}),
        _event_dict(body={"lease_id": "l", "active": 0}),
        _event_dict(node=None),
    ],
)
def test_bad_events_are_validation_errors(data: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        EVENT_DECODER.decode(data)


@pytest.mark.parametrize("pool", ["Chat", "a.b", "*", ">", "", "a" * 64, "-a", "a b"])
def test_health_report_pool_must_be_an_id(pool: str) -> None:
    data = msgspec.json.encode({"type": "health", "pool": pool, "ts": 1.0, "ok": True})
    with pytest.raises(msgspec.ValidationError, match="pool"):
        HEALTH_DECODER.decode(data)


def test_health_report_pool_with_a_trailing_newline_is_refused() -> None:
    data = msgspec.json.encode({"type": "health", "pool": "chat\n", "ts": 1.0, "ok": True})
    with pytest.raises(msgspec.ValidationError):
        HEALTH_DECODER.decode(data)


def test_reply_decoder_needs_the_tag() -> None:
    untagged = msgspec.json.decode(encode(EXAMPLES["reply.accepted"]))
    del untagged["type"]
    with pytest.raises(msgspec.ValidationError):
        REPLY_DECODER.decode(msgspec.json.encode(untagged))


def test_rejected_code_must_be_a_known_code() -> None:
    data = msgspec.json.encode({"type": "rejected", "code": "whatever", "message": "m"})
    with pytest.raises(msgspec.ValidationError, match="code"):
        REPLY_DECODER.decode(data)


# --- subjects ----------------------------------------------------------------------------------

BAD_IDS = ["a.b", "*", ">", "", "A", "Chat", "a" * 64, "-a", "_a", "a b", "a\n", "a\tb", "a/b", "é", "a*", "a>"]


@pytest.fixture
def subjects() -> Subjects:
    return Subjects()


def test_builders(subjects: Subjects) -> None:
    assert subjects.command("chat-8b", "preload") == "poold.cmd.chat-8b.preload"
    assert subjects.commands_of("chat-8b") == "poold.cmd.chat-8b.*"
    assert subjects.node_command("node-1", "pools") == "poold.node.node-1.cmd.pools"
    assert subjects.pool_event("chat-8b", "state_changed") == "poold.evt.chat-8b.state_changed"
    assert subjects.pool_events("chat-8b") == "poold.evt.chat-8b.>"
    assert subjects.node_event("node-1", "heartbeat") == "poold.node.node-1.evt.heartbeat"
    assert subjects.node_events("node-1") == "poold.node.node-1.evt.>"
    assert subjects.health("chat-8b") == "poold.health.chat-8b"
    assert subjects.all_health == "poold.health.*"
    assert subjects.stream_subjects == ["poold.evt.>", "poold.node.*.evt.>"]
    assert Subjects("site.a").command("p", "stop") == "site.a.cmd.p.stop"
    assert msg_id("chat-8b", 12) == "chat-8b:12"


def test_longest_valid_id(subjects: Subjects) -> None:
    pool = "a" * 63
    assert validate_id(pool) == pool
    assert subjects.parse_command(subjects.command(pool, "status")) == (pool, "status")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_refuse_invalid_ids(subjects: Subjects, bad: str) -> None:
    builders: list[Callable[[], str]] = [
        lambda: subjects.command(bad, "preload"),
        lambda: subjects.commands_of(bad),
        lambda: subjects.node_command(bad, "pools"),
        lambda: subjects.pool_event(bad, "state_changed"),
        lambda: subjects.pool_events(bad),
        lambda: subjects.node_event(bad, "heartbeat"),
        lambda: subjects.node_events(bad),
        lambda: subjects.health(bad),
    ]
    for build in builders:
        with pytest.raises(InvalidId) as info:
            build()
        assert info.value.code == "invalid_id"


@pytest.mark.parametrize("value", [None, 5, b"abc", ["a"]])
def test_validate_id_refuses_non_strings(value: object) -> None:
    with pytest.raises(InvalidId, match=type(value).__name__):
        validate_id(value, "pool")


@pytest.mark.parametrize("verb", ["", "Preload", "a.b", "*", ">", "1verb", "pre load", "pre-load"])
def test_builders_refuse_invalid_verbs_and_event_names(subjects: Subjects, verb: str) -> None:
    with pytest.raises(InvalidSubject):
        subjects.command("p", verb)
    with pytest.raises(InvalidSubject):
        subjects.node_command("n", verb)
    with pytest.raises(InvalidSubject):
        subjects.pool_event("p", verb)
    with pytest.raises(InvalidSubject):
        subjects.node_event("n", verb)


@pytest.mark.parametrize("prefix", ["", "a.*", ">", "a..b", ".a", "a.", "a b", "a.>"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidSubject):
        Subjects(prefix)


@pytest.mark.parametrize(
    ("parser", "subject", "error"),
    [
        ("parse_command", "poold.cmd.chat.preload.extra", InvalidSubject),
        ("parse_command", "poold.cmd.chat", InvalidSubject),
        ("parse_command", "other.cmd.chat.preload", InvalidSubject),
        ("parse_command", "poold.cmd.*.preload", InvalidId),
        ("parse_command", "poold.cmd.>.preload", InvalidId),
        ("parse_command", "poold.cmd.Chat.preload", InvalidId),
        ("parse_command", "poold.cmd..preload", InvalidId),
        ("parse_command", "poold.evt.chat.preload", InvalidSubject),
        ("parse_node_command", "poold.node.n1.evt.pools", InvalidSubject),
        ("parse_node_command", "poold.node.n1.cmd", InvalidSubject),
        ("parse_node_command", "poold.node.*.cmd.pools", InvalidId),
        ("parse_health", "poold.health.a.b", InvalidSubject),
        ("parse_health", "poold.health.*", InvalidId),
        ("parse_health", "poold.health.", InvalidId),
        ("parse_health", "poold.healthy.a", InvalidSubject),
        ("parse_pool_event", "poold.evt.chat", InvalidSubject),
        ("parse_pool_event", "poold.evt.chat.a.b", InvalidSubject),
        ("parse_pool_event", "poold.evt.>.state_changed", InvalidId),
    ],
)
def test_parsers_refuse_malformed_subjects(subjects: Subjects, parser: str, subject: str, error: type) -> None:
    with pytest.raises(error):
        getattr(subjects, parser)(subject)


def test_parsers(subjects: Subjects) -> None:
    assert subjects.parse_command("poold.cmd.chat-8b.drain") == ("chat-8b", "drain")
    assert subjects.parse_node_command("poold.node.node-1.cmd.pools") == ("node-1", "pools")
    assert subjects.parse_health("poold.health.chat-8b") == "chat-8b"
    assert subjects.parse_pool_event("poold.evt.chat-8b.state_changed") == ("chat-8b", "state_changed")
    # a pool named like a keyword is still just a pool
    assert subjects.parse_command("poold.cmd.cmd.cmd") == ("cmd", "cmd")


ids = st.from_regex(ID_RE, fullmatch=True)
verbs = st.sampled_from(sorted(POOL_COMMANDS))


@settings(max_examples=200)
@given(pool=ids, node=ids, verb=verbs, prefix=st.sampled_from(["poold", "site-1.poold", "A_B"]))
def test_builders_and_parsers_round_trip(pool: str, node: str, verb: str, prefix: str) -> None:
    subjects = Subjects(prefix)
    assert subjects.parse_command(subjects.command(pool, verb)) == (pool, verb)
    assert subjects.parse_node_command(subjects.node_command(node, "pools")) == (node, "pools")
    assert subjects.parse_health(subjects.health(pool)) == pool
    assert subjects.parse_pool_event(subjects.pool_event(pool, "state_changed")) == (pool, "state_changed")
    # every built subject has exactly the tokens the contract defines, none of them wildcards
    tokens = subjects.command(pool, verb).split(".")
    assert len(tokens) == len(prefix.split(".")) + 3
    assert not {"*", ">", ""} & set(tokens)


@settings(max_examples=200)
@given(value=st.text(max_size=70))
def test_validate_id_agrees_with_the_wire_pattern(value: str) -> None:
    """Any string either is a valid id everywhere (subjects and msgspec) or is refused by subjects."""
    try:
        validate_id(value)
    except InvalidId:
        assert ID_RE.fullmatch(value) is None
        return
    assert "." not in value and "*" not in value and ">" not in value
    assert HEALTH_DECODER.decode(msgspec.json.encode({"pool": value, "ts": 0, "ok": True})).pool == value


def test_every_reject_code_has_a_micro_error_status() -> None:
    from pool_managerd.contract.messages import REJECT_STATUS, RejectCode

    assert set(REJECT_STATUS) == set(typing.get_args(RejectCode))
    assert all(status.isdigit() and len(status) == 3 for status in REJECT_STATUS.values())
