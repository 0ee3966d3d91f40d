"""Device masks: parse what an operator wrote, resolve it against a GPU snapshot, or refuse.

CUDA honours ``CUDA_VISIBLE_DEVICES`` in list order and silently truncates at the first entry it
cannot use (recorded on an H200: ``0,1`` on a 1-GPU host gives 1 device, ``0,0`` gives 0, ``1``
gives 0, an unknown UUID gives 0). So nothing reaches CUDA that has not resolved here to exactly
one known device, and what reaches it is always the list of full UUIDs.

Accepted entries (comma-separated string, or a list with one entry per element):

* ``0``, ``1``: the NVML index (what ``nvidia-smi`` shows; not the CUDA ordinal);
* ``GPU0``, ``gpu1``: the original daemon's spelling of the same index;
* ``GPU-61deac7a-becd-5525-b8e1-312c9b0a037e`` or a unique prefix of it (``GPU-61deac7a``);
* ``MIG-...``: a MIG instance's UUID or a unique prefix of it;
* ``all``, alone: every GPU that is not in MIG mode, in NVML index order.

The canonical form of a resolved mask is the tuple of full UUIDs in mask order; parsing it again
against the same snapshot gives the same mask. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import GpuSnapshot, Placement, Problem

MASK_ERROR_CODES: tuple[str, ...] = (
    "empty_mask",
    "empty_entry",
    "whitespace",
    "bad_token",
    "negative_index",
    "index_out_of_range",
    "unknown_device",
    "ambiguous_prefix",
    "duplicate_device",
    "mig_with_parent",
    "mig_enabled_gpu",
    "mig_multiple",
    "gpu_unhealthy",
)
"""Every code a :class:`MaskError` can carry. Stable: clients may switch on them."""

TokenKind = Literal["index", "gpu_uuid", "mig_uuid", "all"]
DeviceKind = Literal["gpu", "mig"]

# "GPU-1" is a UUID prefix (UUIDs are hex), so only a bare index may carry a sign.
_INDEX_RE = re.compile(r"(-?[0-9]+)|[Gg][Pp][Uu]([0-9]+)")
_UUID_PREFIXES = (("GPU-", "gpu_uuid"), ("MIG-", "mig_uuid"))
_WHITESPACE_RE = re.compile(r"\s")


class MaskError(PoolManagerError):
    """A device mask that cannot be used as written. ``code`` is one of :data:`MASK_ERROR_CODES`.

    ``token`` is the offending entry as written and ``position`` its 0-based place in the mask
    (both None when the mask as a whole is at fault). ``device`` is the UUID concerned, if any.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        token: str | None = None,
        position: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.token = token
        self.position = position
        self.device = device

    def to_problem(self) -> Problem:
        """This error as a wire ``Problem`` (preflight and rejection replies carry these)."""
        return Problem(code=self.code, message=self.message, device=self.device)


@dataclass(frozen=True, slots=True)
class MaskToken:
    """One syntactically valid mask entry, before it is matched against a snapshot."""

    text: str
    position: int
    kind: TokenKind
    index: int | None = None
    """The NVML index for ``kind == "index"``; None otherwise."""


@dataclass(frozen=True, slots=True)
class Device:
    """One addressable device of a snapshot: a whole GPU or a MIG instance."""

    uuid: str
    kind: DeviceKind
    label: str
    """Short human name: ``GPU0`` or ``GPU3/MIG1``."""
    name: str
    index: int
    """NVML index of the GPU, or the MIG instance's index under its parent."""
    memory_total: int
    memory_free: int
    compute_capability: tuple[int, int]
    parent_uuid: str | None = None
    mig_mode: bool = False
    """For a whole GPU: whether it is in MIG mode (then only its instances are usable)."""
    profile: str | None = None
    """For a MIG instance: its profile, e.g. ``3g.40gb``."""
    healthy: bool = True
    """False while the GPU (or a MIG instance's parent) is marked unhealthy by a fault."""


@dataclass(frozen=True, slots=True)
class DeviceMask:
    """A mask resolved against a snapshot: every entry is exactly one device, in mask order."""

    tokens: tuple[str, ...]
    """The entries as written (``("all",)`` for ``all``)."""
    devices: tuple[Device, ...]

    @property
    def uuids(self) -> tuple[str, ...]:
        """Full UUIDs in mask order: the engine's CUDA ordinals 0..n-1."""
        return tuple(d.uuid for d in self.devices)

    @property
    def canonical(self) -> tuple[str, ...]:
        """The canonical tokens (full UUIDs); ``resolve_mask(canonical)`` gives this mask again."""
        return self.uuids

    def canonical_str(self) -> str:
        """The canonical form as one comma-separated string."""
        return ",".join(self.canonical)

    def to_cuda_visible_devices(self) -> str:
        """The value for ``CUDA_VISIBLE_DEVICES``: full UUIDs joined by commas, in mask order."""
        return ",".join(self.uuids)

    @property
    def has_mig(self) -> bool:
        """Whether any entry is a MIG instance."""
        return any(d.kind == "mig" for d in self.devices)


# --------------------------------------------------------------------------------------------
# Syntax
# --------------------------------------------------------------------------------------------


def _parse_entry(text: str, position: int) -> MaskToken:
    if text == "":
        raise MaskError(
            "empty_entry",
            f"mask entry '' at position {position} is empty (doubled, leading or trailing comma?)",
            token=text,
            position=position,
        )
    if _WHITESPACE_RE.search(text):
        raise MaskError(
            "whitespace",
            f"mask entry {text!r} at position {position} contains whitespace; write entries without spaces, e.g. '0,1'",
            token=text,
            position=position,
        )
    if text == "all":
        return MaskToken(text=text, position=position, kind="all")
    m = _INDEX_RE.fullmatch(text)
    if m:
        value = int(m.group(1) if m.group(1) is not None else m.group(2))
        if value < 0:
            raise MaskError(
                "negative_index",
                f"mask entry {text!r} at position {position} is a negative index",
                token=text,
                position=position,
            )
        return MaskToken(text=text, position=position, kind="index", index=value)
    for prefix, kind in _UUID_PREFIXES:
        if text.startswith(prefix) and len(text) > len(prefix):
            return MaskToken(text=text, position=position, kind=kind)  # type: ignore[arg-type]
    raise MaskError(
        "bad_token",
        f"mask entry {text!r} at position {position} is not an index (0, GPU0), a GPU-... or "
        "MIG-... UUID (or a unique prefix), or 'all'",
        token=text,
        position=position,
    )


def parse_mask(mask: str | Sequence[str]) -> tuple[MaskToken, ...]:
    """Check a mask's syntax without a snapshot.

    ``mask`` is a comma-separated string or a sequence with one entry per element.
    Raises :class:`MaskError` (``empty_mask``, ``empty_entry``, ``whitespace``, ``bad_token``,
    ``negative_index``).
    """
    if isinstance(mask, str):
        if mask == "":
            raise MaskError("empty_mask", "device mask is empty: name at least one GPU")
        entries: list[str] = mask.split(",")
    else:
        entries = []
        for position, item in enumerate(mask):
            if not isinstance(item, str):
                raise MaskError(
                    "bad_token",
                    f"mask entry at position {position} is a {type(item).__name__}, not a string",
                    token=repr(item),
                    position=position,
                )
            if "," in item:
                raise MaskError(
                    "bad_token",
                    f"mask entry {item!r} at position {position} contains a comma; give one device per list element",
                    token=item,
                    position=position,
                )
            entries.append(item)
        if not entries:
            raise MaskError("empty_mask", "device mask is empty: name at least one GPU")
    tokens = tuple(_parse_entry(text, position) for position, text in enumerate(entries))
    if len(tokens) > 1:
        for tok in tokens:
            if tok.kind == "all":
                raise MaskError(
                    "bad_token",
                    f"'all' at position {tok.position} must be the only mask entry",
                    token=tok.text,
                    position=tok.position,
                )
    return tokens


# --------------------------------------------------------------------------------------------
# Resolution against a snapshot
# --------------------------------------------------------------------------------------------


def snapshot_devices(snapshot: GpuSnapshot) -> tuple[Device, ...]:
    """Every addressable device of a snapshot: each GPU, then its MIG instances, by NVML index."""
    out: list[Device] = []
    for gpu in sorted(snapshot.gpus, key=lambda g: g.index):
        out.append(
            Device(
                uuid=gpu.uuid,
                kind="gpu",
                label=f"GPU{gpu.index}",
                name=gpu.name,
                index=gpu.index,
                memory_total=gpu.memory_total,
                memory_free=gpu.memory_free,
                compute_capability=(gpu.compute_capability[0], gpu.compute_capability[1]),
                mig_mode=gpu.mig_mode,
                healthy=gpu.healthy,
            )
        )
        for mig in sorted(gpu.mig_instances, key=lambda m: m.index):
            out.append(
                Device(
                    uuid=mig.uuid,
                    kind="mig",
                    label=f"GPU{gpu.index}/MIG{mig.index}",
                    name=f"{gpu.name} MIG {mig.profile}",
                    index=mig.index,
                    memory_total=mig.memory_total,
                    memory_free=mig.memory_free,
                    compute_capability=(gpu.compute_capability[0], gpu.compute_capability[1]),
                    parent_uuid=gpu.uuid,
                    profile=mig.profile,
                    healthy=gpu.healthy,
                )
            )
    return tuple(out)


def _match(token: MaskToken, devices: Sequence[Device], gpu_count: int) -> Device:
    if token.kind == "index":
        for dev in devices:
            if dev.kind == "gpu" and dev.index == token.index:
                return dev
        indices = sorted(d.index for d in devices if d.kind == "gpu")
        have = f"indices {', '.join(map(str, indices))}" if indices else "no GPUs"
        raise MaskError(
            "index_out_of_range",
            f"mask entry {token.text!r} at position {token.position}: no GPU with index "
            f"{token.index}; this host has {gpu_count} GPU(s) ({have})",
            token=token.text,
            position=token.position,
        )
    kind: DeviceKind = "gpu" if token.kind == "gpu_uuid" else "mig"
    pool = [d for d in devices if d.kind == kind]
    exact = [d for d in pool if d.uuid == token.text]
    if exact:
        return exact[0]
    hits = [d for d in pool if d.uuid.startswith(token.text)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise MaskError(
            "unknown_device",
            f"mask entry {token.text!r} at position {token.position} matches no "
            f"{'GPU' if kind == 'gpu' else 'MIG instance'} on this host",
            token=token.text,
            position=token.position,
        )
    names = ", ".join(f"{d.label}={d.uuid}" for d in hits)
    raise MaskError(
        "ambiguous_prefix",
        f"mask entry {token.text!r} at position {token.position} is a prefix of {len(hits)} "
        f"devices ({names}); write more of the UUID",
        token=token.text,
        position=token.position,
    )


def resolve_mask(mask: str | Sequence[str], snapshot: GpuSnapshot) -> DeviceMask:
    """Parse ``mask`` and resolve every entry to exactly one device of ``snapshot``.

    Raises :class:`MaskError` for any syntax error (see :func:`parse_mask`) and for
    ``index_out_of_range``, ``unknown_device``, ``ambiguous_prefix``, ``duplicate_device`` (one
    device named twice, also by index and UUID), ``mig_with_parent`` (a MIG instance with its
    parent GPU), ``mig_enabled_gpu`` (a GPU in MIG mode named as a whole: only its instances run
    CUDA work) and ``mig_multiple`` (more than one MIG instance: a CUDA process enumerates only
    one MIG device, so CUDA would silently drop the rest).
    """
    tokens = parse_mask(mask)
    devices = snapshot_devices(snapshot)
    gpu_count = sum(1 for d in devices if d.kind == "gpu")

    if tokens[0].kind == "all":
        chosen = tuple(d for d in devices if d.kind == "gpu" and not d.mig_mode and d.healthy)
        if not chosen:
            raise MaskError(
                "unknown_device",
                "mask 'all' matches no usable GPU: the snapshot has no healthy GPU outside MIG mode",
                token="all",
                position=0,
            )
        return DeviceMask(tokens=("all",), devices=chosen)

    resolved: list[tuple[MaskToken, Device]] = []
    for tok in tokens:
        dev = _match(tok, devices, gpu_count)
        for prev_tok, prev in resolved:
            if prev.uuid == dev.uuid:
                raise MaskError(
                    "duplicate_device",
                    f"mask entry {tok.text!r} at position {tok.position} names {dev.label} "
                    f"({dev.uuid}) again, already named by {prev_tok.text!r} at position "
                    f"{prev_tok.position}",
                    token=tok.text,
                    position=tok.position,
                    device=dev.uuid,
                )
            if dev.parent_uuid == prev.uuid or prev.parent_uuid == dev.uuid:
                mig, parent = (dev, prev) if dev.kind == "mig" else (prev, dev)
                raise MaskError(
                    "mig_with_parent",
                    f"mask entry {tok.text!r} at position {tok.position} and "
                    f"{prev_tok.text!r} at position {prev_tok.position} name MIG instance "
                    f"{mig.label} together with its parent GPU {parent.label}",
                    token=tok.text,
                    position=tok.position,
                    device=dev.uuid,
                )
        resolved.append((tok, dev))

    for tok, dev in resolved:
        if not dev.healthy:
            raise MaskError(
                "gpu_unhealthy",
                f"mask entry {tok.text!r} at position {tok.position} names {dev.label} ({dev.uuid}), "
                "marked unhealthy after a GPU fault; an operator clears it with ctl gpu-clear",
                token=tok.text,
                position=tok.position,
                device=dev.uuid,
            )
        if dev.kind == "gpu" and dev.mig_mode:
            raise MaskError(
                "mig_enabled_gpu",
                f"mask entry {tok.text!r} at position {tok.position} names {dev.label}, which is "
                "in MIG mode: name one of its MIG instances (MIG-...) instead",
                token=tok.text,
                position=tok.position,
                device=dev.uuid,
            )
    migs = [(tok, dev) for tok, dev in resolved if dev.kind == "mig"]
    if len(migs) > 1:
        tok, dev = migs[1]
        raise MaskError(
            "mig_multiple",
            f"mask entry {tok.text!r} at position {tok.position} is a second MIG instance; a "
            "CUDA process enumerates only one MIG device, so CUDA would silently drop it",
            token=tok.text,
            position=tok.position,
            device=dev.uuid,
        )
    return DeviceMask(tokens=tuple(t.text for t in tokens), devices=tuple(d for _, d in resolved))


def mask_placement(mask: DeviceMask, *, simulated: bool = False) -> Placement:
    """The mask part of a wire ``Placement``: canonical tokens, UUIDs, ``CUDA_VISIBLE_DEVICES``.

    The split fields keep their defaults; :func:`pool_managerd.placement.hetero_split.to_placement`
    fills them.
    """
    return Placement(
        mask=list(mask.canonical),
        uuids=list(mask.uuids),
        cuda_visible_devices=mask.to_cuda_visible_devices(),
        simulated=simulated,
    )
