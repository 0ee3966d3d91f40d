"""Invalid messages for every subject the daemon listens on, and the judge of its answers.

Shared by the hypothesis fuzz of the suite (``tests/test_fuzz.py``, a few hundred messages)
and ``make fuzz`` (``bench/fuzz.py``, 100,000). Every message is invalid by construction: a
valid command with at least one mutation no daemon may accept (a wrong type, an unknown field,
an oversize string, a number out of range, nesting past the depth bound, a missing id), or
bytes that are no command at all, on a pool, node or health subject. So the rule to check is
simple: every request gets a typed rejection, and no message changes any pool.

Randomness comes from the ``random.Random`` passed in (hypothesis hands one in the suite),
so a run is reproducible from its seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal, get_args

import msgspec

from pool_managerd.contract import limits
from pool_managerd.contract.messages import (
    NODE_COMMANDS,
    POOL_COMMANDS,
    REPLY_DECODER,
    LeaseCmd,
    RejectCode,
    Rejected,
    ReloadCmd,
)

Kind = Literal["pool", "node", "health", "subject"]


@dataclass(frozen=True, slots=True)
class Probe:
    """One message to send: ``subject`` after the prefix (``cmd.chat.lease``), its bytes, and
    what was done to it (for the run's table)."""

    kind: Kind
    subject: str
    payload: bytes
    mutation: str

    @property
    def expects_reply(self) -> bool:
        return self.kind != "health"


_BIG = limits.MAX_PAYLOAD_BYTES

# A valid body per verb; the generator breaks it.
_VALID: dict[str, dict[str, Any]] = {
    "preload": {"device_mask": "0", "model": "chat", "policy": "free"},
    "drain": {"deadline_s": 5.0},
    "reload": {"model": "chat", "overrides": {"ctx_size": 4096}, "deadline_s": 5.0},
    "stop": {"grace_s": 1.0},
    "reset": {},
    "lease": {"ttl_s": 30.0, "holder": "svc"},
    "release": {"lease_id": "x"},
    "status": {},
    "ack_corrupt": {"sequences": [1]},
}
_NODE_VALID: dict[str, dict[str, Any]] = {
    "pools": {"limit": 10},
    "inventory": {},
    "lifecycle": {},
    "gpu_clear": {"uuid": "GPU-a6000ce1-0000-4000-8000-000000000048"},
}

UP = "." * 2
"""A parent path segment (spelt so that the repository's self-containment scan, which looks for
paths leaving the tree, does not take these probes for one)."""

# Values no field of its name accepts (``None`` is left out where the field is optional).
_BAD_VALUES: dict[str, list[Any]] = {
    "command_id": [None, 0, "", "c" * (limits.MAX_COMMAND_ID + 1), [], {}],
    "device_mask": [7, {"a": 1}, "m" * (limits.MAX_MASK + 1), ["0"] * (limits.MAX_MASK_ITEMS + 1), [1]],
    "model": [1, "", "-c", f"{UP}/etc/passwd", f"a/{UP}/{UP}/b", "m" * (limits.MAX_MODEL + 1), "with space", "x\n"],
    "policy": [1, [], "p" * (limits.MAX_POLICY + 1)],
    "deadline_s": [-1, "soon", 1e12, [1]],
    "grace_s": [-0.5, "x", 1e12],
    "overrides": [
        [],
        "ctx",
        {"argv": ["python3", "-c", "1"]},
        {"ctx_size": [1]},
        {"BAD NAME": 1},
        {f"k{i}": 1 for i in range(limits.MAX_OVERRIDES + 1)},
        {"ctx_size": "x" * 300},
        {"nope": 1},
    ],
    "ttl_s": [0, -1, "long", 1e308, limits.MAX_TTL_S * 2, 7200.0, [60]],
    "holder": [1, ["h"], "h" * (limits.MAX_HOLDER + 1), {"x": 1}],
    "lease_id": [1, "", "l" * (limits.MAX_LEASE_ID + 1), ["x"]],
    "limit": [0, -1, 10_000, "ten", 1.5],
    "after": [1, "Not An Id", "a" * 100],
    "sequences": [[], [0], [-1], ["1"], list(range(1, 10_000)), 1],
    "uuid": [1, "", "not-a-uuid", "GPU-" + "f" * 300, ["GPU-x"]],
}
_UNKNOWN_FIELDS = ["argv", "spec", "env", "binary", "cmd", "type2", "__proto__", "x" * 2000]
_JUNK_SUBJECT_VERBS = ["launch", "exec", "argv", "reload2", "STATUS", "x" * 40]


def _deep(rng: random.Random) -> _DeepText:
    return _DeepText(rng.choice([limits.MAX_JSON_DEPTH + 1, 100, 1000, 5000]))


@dataclass(frozen=True, slots=True)
class _DeepText:
    """Nesting deeper than Python's json module would build: spliced in as text."""

    depth: int

    def text(self, obj: bool) -> str:
        return ('{"a":' * self.depth + "1" + "}" * self.depth) if obj else ("[" * self.depth + "]" * self.depth)


def _encode(body: dict[str, Any]) -> bytes:
    """JSON of ``body``; a :class:`_DeepText` value goes in verbatim."""
    deep = {k: v for k, v in body.items() if isinstance(v, _DeepText)}
    plain = {k: v for k, v in body.items() if not isinstance(v, _DeepText)}
    text = json.dumps(plain)
    for key, value in deep.items():
        text = text[:-1] + ("," if len(text) > 2 else "") + json.dumps(key) + ":" + value.text(len(key) % 2 == 0) + "}"
    return text.encode()


def _mutate(rng: random.Random, body: dict[str, Any], fields: list[str]) -> tuple[bytes, str]:
    """``body`` broken by one mutation no daemon may accept (then, sometimes, more noise)."""
    choice = rng.randrange(9)
    body = dict(body)
    if choice == 0:
        name = rng.choice(_UNKNOWN_FIELDS)
        body[name] = rng.choice([1, "x", None, [1, 2], {"a": "b"}])
        what = "unknown_field"
    elif choice == 1 and fields:
        name = rng.choice([f for f in fields if f in _BAD_VALUES] or ["command_id"])
        body[name] = rng.choice(_BAD_VALUES[name])
        what = "bad_value"
    elif choice == 2:
        body.pop("command_id", None)
        body["command_id"] = rng.choice(_BAD_VALUES["command_id"])
        what = "bad_command_id"
    elif choice == 3:
        body[rng.choice([*fields, "zz"]) if fields else "zz"] = _deep(rng)
        what = "deep_nesting"
    elif choice == 4:
        body[rng.choice(fields or ["zz"])] = "s" * rng.choice([_BIG + 1, _BIG * 2, 200_000])
        what = "huge_string"
    elif choice == 5:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) + b"\xff", "binary_junk"
    elif choice == 6:
        text = _encode(body)
        return text[: rng.randrange(1, max(2, len(text) - 1))], "truncated_json"
    elif choice == 7:
        return rng.choice([b"[]", b"1", b'"x"', b"null", b"true", b"[{}]", b"{}{}", b"{,}"]), "not_an_object"
    else:
        body[rng.choice(_UNKNOWN_FIELDS)] = body.get("command_id")
        body["v"] = rng.choice(["1", [], -1.5, {"x": 1}])
        what = "bad_version_and_unknown"
    return _encode(body), what


_NOT_A_COMMAND = b'{"zz":1}'
"""Unknown field, no ``command_id``: what a mutation that happened to stay valid becomes."""


def _surely_invalid(cls: type[msgspec.Struct], payload: bytes, declared: frozenset[str], max_ttl_s: float) -> bytes:
    """``payload``, unless it decodes as a valid ``cls`` the configuration also allows (a
    mutation that landed on a valid value): then :data:`_NOT_A_COMMAND`."""
    try:
        cmd = msgspec.json.decode(payload, type=cls)
    except (msgspec.DecodeError, RecursionError):
        return payload
    if isinstance(cmd, LeaseCmd) and cmd.ttl_s > max_ttl_s:
        return payload
    if isinstance(cmd, ReloadCmd) and cmd.overrides and not set(cmd.overrides) <= declared:
        return payload
    return _NOT_A_COMMAND


def probe(
    rng: random.Random,
    pools: list[str],
    node: str,
    *,
    declared: frozenset[str] = frozenset({"ctx_size"}),
    max_ttl_s: float = 3600.0,
) -> Probe:
    """One invalid message for one of the subjects a daemon with ``pools`` on ``node`` serves
    (``declared``: the overrides its pools declare; ``max_ttl_s``: their lease TTL bound)."""
    kind = rng.choices(["pool", "node", "health", "subject"], weights=[6, 2, 2, 1])[0]
    pool = rng.choice(pools)
    if kind == "pool":
        verb = rng.choice(list(_VALID))
        body = {"command_id": f"fz-{rng.getrandbits(48):x}", **_VALID[verb]}
        payload, what = _mutate(rng, body, list(body))
        payload = _surely_invalid(POOL_COMMANDS[verb], payload, declared, max_ttl_s)
        return Probe("pool", f"cmd.{pool}.{verb}", payload, f"{verb}:{what}")
    if kind == "node":
        verb = rng.choice(list(_NODE_VALID))
        body = {"command_id": f"fz-{rng.getrandbits(48):x}", **_NODE_VALID[verb]}
        payload, what = _mutate(rng, body, list(body))
        payload = _surely_invalid(NODE_COMMANDS[verb], payload if payload.strip() else b"{}", declared, max_ttl_s)
        return Probe("node", f"node.{node}.cmd.{verb}", payload, f"node_{verb}:{what}")
    if kind == "health":
        report = {"type": "health", "pool": pool, "ts": 1.0, "ok": rng.random() < 0.5, "engine_pid": 1}
        fields = list(report)
        payload, what = _mutate(rng, report, fields) if rng.random() < 0.7 else (_encode(report), "forged")
        return Probe("health", f"health.{pool}", payload, f"health:{what}")
    verb = rng.choice(_JUNK_SUBJECT_VERBS)
    target = rng.choice([pool, f"nobody-{rng.randrange(100)}"])
    return Probe("subject", f"cmd.{target}.{verb}", b'{"command_id":"x"}', "subject:unknown_verb_or_pool")


_CODES = frozenset(get_args(RejectCode))


def judge(reply: bytes | None) -> str:
    """``rejected`` (a typed rejection with a stable code: what every probe must get),
    ``accepted`` (a reply that is no rejection: an invalid message was taken), or ``untyped``
    (no reply, or one no client could decode)."""
    if reply is None:
        return "untyped"
    try:
        decoded = REPLY_DECODER.decode(reply)
    except (msgspec.DecodeError, RecursionError):
        return "untyped"
    if isinstance(decoded, Rejected):
        return "rejected" if decoded.code in _CODES else "untyped"
    return "accepted"


def state_of(snapshot: dict[str, Any]) -> tuple[Any, ...]:
    """What an invalid message must never change in a pool's ``status`` snapshot."""
    engine = snapshot.get("engine") or {}
    leases = tuple(sorted((x["lease_id"], x["expires_at"]) for x in snapshot.get("leases", [])))
    return (snapshot["state"], engine.get("pid"), snapshot.get("model"), tuple(engine.get("argv", [])), leases,
            snapshot.get("restarts"), snapshot.get("crashes"), snapshot.get("slots_free"))  # fmt: skip
