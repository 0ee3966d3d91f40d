"""Configuration: pydantic-settings models read from a TOML or YAML file, overridden by
``POOL_MANAGERD_*`` environment variables (nested keys with ``__``, e.g.
``POOL_MANAGERD_NATS__URLS='["nats://10.0.0.5:4222"]'``).

Every error names the file, the key and the problem; the daemon exits non-zero before touching
anything. Engine presets fill in argv templates and supervision defaults per engine kind.

One job, a long module: the pydantic models of one configuration file, its presets and their
cross-field checks; every key of the README's config reference is defined here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pool_managerd.adapters.gpu_profiles import SIM_PREFIX, list_profiles
from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.limits import MAX_MODEL, MAX_OVERRIDE_TEXT, MAX_OVERRIDES, MAX_SLOTS, MAX_TTL_S
from pool_managerd.contract.messages import EngineSpec
from pool_managerd.contract.subjects import ID_RE
from pool_managerd.core.definitions import DEFAULT_MAX_LEASE_TTL_S, OverrideDecl, PoolDefinition
from pool_managerd.core.gpu_verify import DEFAULT_MIN_FRACTION, GpuCheckPolicy
from pool_managerd.lifecycle.supervision import RestartPolicy

EngineKind = Literal["llamacpp", "vllm", "tgi", "sglang", "custom", "fake"]

PREFIX_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")

PLACEHOLDERS = ("{model}", "{port}", "{host}", "{tensor_split}", "{n_gpus}")


class ConfigError(PoolManagerError):
    """The configuration is invalid; ``message`` lists every problem as ``file: key: problem``."""

    code = "bad_config"


class Preset(BaseModel):
    """Defaults of one engine kind."""

    argv: list[str]
    health_path: str = "/health"
    load_timeout_s: float = 300.0
    stop_grace_s: float = 10.0
    gpu_check_deadline_s: float = 30.0
    """How long after its first healthy probe the engine has to hold memory on every GPU of its
    placement (see the README: what is verified after launch, per preset)."""


def _fake_argv() -> list[str]:
    return [sys.executable, "-m", "pool_managerd.testing.fake_engine", "--host", "{host}", "--port", "{port}",
            "--model", "{model}"]  # fmt: skip


PRESETS: dict[str, Preset] = {
    # llama.cpp: --tensor-split is dropped by the renderer when the plan has no split.
    "llamacpp": Preset(
        argv=[
            "llama-server",
            "--model",
            "{model}",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--n-gpu-layers",
            "999",
            "--tensor-split",
            "{tensor_split}",
        ],
        load_timeout_s=300.0,
        # llama-server answers 200 only once the weights are offloaded; mmap'd pages of a model
        # read from a cold disk may still arrive, so a little slack.
        gpu_check_deadline_s=15.0,
    ),
    "vllm": Preset(
        argv=["vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--tensor-parallel-size", "{n_gpus}"],
        load_timeout_s=900.0,
        stop_grace_s=30.0,
        # The profiling run and the KV cache come before the API server answers; the API
        # process's own CUDA context may lag behind a worker's.
        gpu_check_deadline_s=60.0,
    ),
    "tgi": Preset(
        argv=[
            "text-generation-launcher",
            "--model-id",
            "{model}",
            "--hostname",
            "{host}",
            "--port",
            "{port}",
            "--num-shard",
            "{n_gpus}",
        ],
        load_timeout_s=900.0,
        stop_grace_s=30.0,
        gpu_check_deadline_s=60.0,
    ),
    "sglang": Preset(
        argv=[
            "python3",
            "-m",
            "sglang.launch_server",
            "--model-path",
            "{model}",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--tp",
            "{n_gpus}",
        ],
        load_timeout_s=900.0,
        stop_grace_s=30.0,
        gpu_check_deadline_s=60.0,
    ),
    "fake": Preset(argv=_fake_argv(), load_timeout_s=30.0, stop_grace_s=5.0, gpu_check_deadline_s=5.0),
}


class _Strict(BaseModel):
    # inf and nan are floats to pydantic; a timeout of inf never fires, so refuse them everywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RestartConfig(_Strict):
    """Supervision settings (see ``lifecycle/supervision.py`` for the anchors)."""

    initial_s: Annotated[float, Field(ge=0)] = 1.0
    factor: Annotated[float, Field(ge=1)] = 2.0
    max_s: Annotated[float, Field(ge=0)] = 60.0
    jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1
    stable_s: Annotated[float, Field(gt=0)] = 60.0
    max_consecutive_failures: Annotated[int, Field(ge=1)] = 5
    max_restarts: Annotated[int, Field(ge=1)] = 10
    window_s: Annotated[float, Field(gt=0)] = 60.0

    @model_validator(mode="after")
    def _cap_above_initial(self) -> RestartConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self

    def policy(self) -> RestartPolicy:
        return RestartPolicy(**self.model_dump())


FLAG_RE = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_.-]*")
OVERRIDE_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class OverrideConfig(_Strict):
    """One value a ``reload`` may set: ``{type = "int", min = 512, max = 131072, flag = "--ctx-size"}``.

    The value follows ``flag`` at the end of the configured argv (a ``bool`` adds the bare flag
    when true); ``int``/``float`` need ``min`` and ``max``, ``choice`` needs ``choices``."""

    type: Literal["int", "float", "bool", "choice"]
    flag: str
    min: float | None = None
    max: float | None = None
    choices: list[Annotated[str, Field(min_length=1, max_length=MAX_OVERRIDE_TEXT)]] | None = None

    @field_validator("flag")
    @classmethod
    def _valid_flag(cls, value: str) -> str:
        if not FLAG_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a flag like '--ctx-size'")
        return value

    @model_validator(mode="after")
    def _bounded(self) -> OverrideConfig:
        if self.type in ("int", "float"):
            if self.min is None or self.max is None:
                raise ValueError(f"an override of type {self.type} needs min and max")
            if self.min > self.max:
                raise ValueError("min must be <= max")
        if self.type == "choice" and not self.choices:
            raise ValueError("an override of type choice needs choices")
        if self.type != "choice" and self.choices:
            raise ValueError("choices go with type choice only")
        return self

    def decl(self, name: str) -> OverrideDecl:
        return OverrideDecl(name=name, kind=self.type, flag=self.flag, min=self.min, max=self.max,
                            choices=tuple(self.choices or ()))  # fmt: skip


class PoolConfig(_Strict):
    """One pool: which engine, which model, where, and how it is supervised."""

    id: str
    engine: EngineKind = "llamacpp"
    argv: list[str] | None = None
    """Full argv template; required for ``custom``, replaces the preset's otherwise."""
    extra_args: list[str] = Field(default_factory=list)
    """Appended to the preset's argv (e.g. fake-engine knobs, ``--ctx-size 8192``)."""
    binary: str | None = None
    """Replaces argv[0] of the preset (e.g. a full path to llama-server)."""
    model: str = ""
    model_digest: str | None = None
    model_bytes: Annotated[int, Field(ge=0)] | None = None
    context_bytes: Annotated[int, Field(ge=0)] = 0
    headroom_bytes: Annotated[int, Field(ge=0)] = 0
    device_mask: str | list[str] = "auto"
    split_policy: str = "free"
    slots: Annotated[int, Field(ge=1, le=MAX_SLOTS)] = 1
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    health_path: str | None = None
    load_timeout_s: Annotated[float, Field(gt=0)] | None = None
    stop_grace_s: Annotated[float, Field(ge=0)] | None = None
    probe_interval_s: Annotated[float, Field(gt=0)] = 2.0
    probe_failure_threshold: Annotated[int, Field(ge=1)] = 3
    external_health: bool = False
    """Let reports on ``<prefix>.health.<pool>`` from other publishers count toward ``health_lost``.
    Off by default: anyone who may publish there could otherwise restart the pool. Even when on, an
    outside report never makes a pool ready; only the daemon's own prober does."""
    min_compute_capability: str | None = None
    engine_version: str | None = None
    restart: RestartConfig = Field(default_factory=RestartConfig)
    models: list[Annotated[str, Field(min_length=1, max_length=MAX_MODEL)]] = Field(default_factory=list)
    """The models a ``preload`` or ``reload`` command may choose; empty: any well-formed name
    (no flag, no ``..`` segment). Set it wherever a client should not pick any file."""
    overrides: dict[str, OverrideConfig] = Field(default_factory=dict)
    """What a ``reload`` may set beyond the model, each with its type, bounds and flag."""
    max_lease_ttl_s: Annotated[float, Field(gt=0, le=MAX_TTL_S)] = DEFAULT_MAX_LEASE_TTL_S
    """The longest TTL a ``lease`` may ask for; longer ones are refused with ``bad_request``."""

    @field_validator("overrides")
    @classmethod
    def _override_names(cls, value: dict[str, OverrideConfig]) -> dict[str, OverrideConfig]:
        for name in value:
            if not OVERRIDE_NAME_RE.fullmatch(name):
                raise ValueError(f"override name {name!r} must match ^[a-z][a-z0-9_]{{0,63}}$")
        if len(value) > MAX_OVERRIDES:
            raise ValueError(f"at most {MAX_OVERRIDES} overrides")
        return value

    gpu_check: Literal["enforce", "off"] = "enforce"
    """After the first healthy probe, check that the engine's processes hold memory on every GPU
    of the placement before the pool is ready (``off``: the probe alone makes it ready)."""
    gpu_check_deadline_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    """How long the engine has to allocate after its first healthy probe (default: the preset's)."""
    gpu_check_min_fraction: Annotated[float, Field(ge=0, le=1)] = DEFAULT_MIN_FRACTION
    """Share of each GPU's planned budget the engine must hold by the deadline."""
    standby: Annotated[list[str], Field(max_length=64)] = Field(default_factory=list)
    """Nodes that take the pool over while running when its owner stops renewing its lease.
    Empty: every node that configures the pool does. A node not named still claims the pool
    when it is free (never claimed, released) or found unrenewed at its own start-up."""

    @field_validator("standby")
    @classmethod
    def _valid_standby(cls, nodes: list[str]) -> list[str]:
        for node in nodes:
            if not ID_RE.fullmatch(node):
                raise ValueError(f"{node!r} is not a valid node id (^[a-z0-9][a-z0-9_-]{{0,62}}$)")
        return nodes

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not ID_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid pool id (^[a-z0-9][a-z0-9_-]{{0,62}}$)")
        return value

    @field_validator("min_compute_capability")
    @classmethod
    def _valid_cc(cls, value: str | None) -> str | None:
        if value is not None:
            major, _, minor = value.partition(".")
            if not (major.isdigit() and minor.isdigit()):
                raise ValueError(f"{value!r} is not a compute capability like '8.0'")
        return value

    @model_validator(mode="after")
    def _argv_known(self) -> PoolConfig:
        if self.engine == "custom" and not self.argv:
            raise ValueError("engine 'custom' needs an argv template")
        for arg in self.resolved_argv():
            for part in arg.split("{")[1:]:
                name = "{" + part.split("}")[0] + "}"
                if "}" in part and name not in PLACEHOLDERS:
                    raise ValueError(f"argv uses unknown placeholder {name}; known: {', '.join(PLACEHOLDERS)}")
        return self

    def resolved_argv(self) -> list[str]:
        if self.argv:
            argv = list(self.argv)
        else:
            argv = list(PRESETS[self.engine].argv) if self.engine != "custom" else []
            if self.binary and argv:
                argv[0] = self.binary
        return argv + list(self.extra_args)

    def spec(self) -> EngineSpec:
        """The resolved engine spec (preset defaults filled in)."""
        preset = PRESETS.get(self.engine)
        cc = None
        if self.min_compute_capability:
            major, _, minor = self.min_compute_capability.partition(".")
            cc = (int(major), int(minor))
        return EngineSpec(
            preset=self.engine,
            argv=self.resolved_argv(),
            env=dict(self.env),
            # The fake engine serves any name; a pool's id is a readable default.
            model=self.model or (self.id if self.engine == "fake" else ""),
            model_digest=self.model_digest,
            health_path=self.health_path or (preset.health_path if preset else "/health"),
            host=self.host,
            port=self.port,
            load_timeout_s=self.load_timeout_s or (preset.load_timeout_s if preset else 300.0),
            stop_grace_s=self.stop_grace_s
            if self.stop_grace_s is not None
            else (preset.stop_grace_s if preset else 10.0),
            probe_interval_s=self.probe_interval_s,
            probe_failure_threshold=self.probe_failure_threshold,
            slots=self.slots,
            min_compute_capability=cc,
            engine_version=self.engine_version,
        )

    def definition(self) -> PoolDefinition:
        """The pure core's view of this pool."""
        return PoolDefinition(
            pool=self.id,
            spec=self.spec(),
            device_mask=None if self.device_mask == "auto" else self.device_mask,
            split_policy=self.split_policy,
            restart=self.restart.policy(),
            model_bytes=self.model_bytes,
            context_bytes=self.context_bytes,
            headroom_bytes=self.headroom_bytes,
            overrides=tuple(decl.decl(name) for name, decl in self.overrides.items()),
            models=tuple(self.models),
            max_lease_ttl_s=self.max_lease_ttl_s,
            gpu_check=self.gpu_check_policy(),
        )

    def gpu_check_policy(self) -> GpuCheckPolicy | None:
        """The post-launch GPU check of this pool, or None when it is off."""
        if self.gpu_check == "off":
            return None
        preset = PRESETS.get(self.engine)
        deadline = self.gpu_check_deadline_s or (preset.gpu_check_deadline_s if preset else 30.0)
        return GpuCheckPolicy(deadline_s=deadline, min_fraction=self.gpu_check_min_fraction)


class NatsConfig(_Strict):
    """How to reach NATS. No ``urls`` means: start an embedded nats-server in the run dir."""

    urls: list[str] = Field(default_factory=list)
    prefix: str = "poold"
    name: str | None = None
    credentials_file: Path | None = None
    nkey_seed_file: Path | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    inbox_prefix: str | None = None
    """Where replies to this client go; default ``_INBOX.<user>`` with a ``user`` (what the
    shipped permissions allow each user), else nats-py's ``_INBOX``."""
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    startup_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    ping_interval_s: Annotated[float, Field(gt=0)] = 10.0
    max_outstanding_pings: Annotated[int, Field(ge=1)] = 3
    reconnect_wait_s: Annotated[float, Field(gt=0)] = 1.0
    event_max_age_s: Annotated[float, Field(gt=0)] | None = 30 * 24 * 3600.0
    publish_backlog: Annotated[int, Field(ge=1)] = 10_000
    replicas: int = 1
    """Copies JetStream keeps of every stream and bucket the daemon creates (the event stream,
    the KV buckets): 1, 3 or 5, at most the cluster's size. Above 1 the server must be clustered
    (checked at connect: exit 2). Changing it on an existing stream resizes the stream."""
    audit_max_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024 * 1024
    """Size bound of the audit stream of refused commands; the oldest records go first."""
    embedded_websocket: bool = True
    """The embedded nats-server (no ``urls``) also listens for websocket clients (the dashboard)."""
    embedded_websocket_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """Port of that listener; 0 picks a free one (printed at start-up)."""

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        # The prefix is the first tokens of every subject the daemon builds; a wildcard or an empty
        # token would make the daemon subscribe to (and answer for) subjects it does not own.
        if not value or not all(PREFIX_TOKEN_RE.fullmatch(token) for token in value.split(".")):
            raise ValueError(
                f"{value!r} is not a subject prefix: dot-separated tokens of letters, digits, '_' and '-' "
                "(no wildcards, spaces or empty tokens)"
            )
        return value

    @field_validator("replicas")
    @classmethod
    def _valid_replicas(cls, value: int) -> int:
        # Raft needs a majority: an even count tolerates no more failures than the odd one below it.
        if value not in (1, 3, 5):
            raise ValueError(f"{value} is not a replica count: 1, 3 or 5 (at most the cluster's size)")
        return value

    @field_validator("inbox_prefix")
    @classmethod
    def _valid_inbox(cls, value: str | None) -> str | None:
        if value is not None and not all(PREFIX_TOKEN_RE.fullmatch(token) for token in value.split(".")):
            raise ValueError(f"{value!r} is not an inbox prefix: dot-separated literal subject tokens")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> NatsConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.user is not None and self.password is None:
            raise ValueError("user needs a password")
        return self


class OwnershipConfig(_Strict):
    """The pools' ownership leases (README "Ownership"): how long one lasts unrenewed, and the
    safety margin on each side (the owner stops ``margin`` before it lapses; others claim
    ``margin`` after)."""

    # 30 s / 5 s leaves room for a JetStream leader election of the ownership bucket (5-8 s when
    # the server leading it dies) plus a renewal's own timeout; 15 s / 2 s lost leases to one kill.
    lease_ttl_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    lease_margin_s: Annotated[float, Field(gt=0, le=600)] = 5.0

    @model_validator(mode="after")
    def _margin_fits(self) -> OwnershipConfig:
        if self.lease_margin_s * 2 >= self.lease_ttl_s:
            raise ValueError(f"lease_margin_s ({self.lease_margin_s}) must be under half of lease_ttl_s "
                             f"({self.lease_ttl_s})")  # fmt: skip
        return self


class DaemonConfig(BaseSettings):
    """The whole daemon configuration."""

    model_config = SettingsConfigDict(
        env_prefix="POOL_MANAGERD_", env_nested_delimiter="__", extra="forbid", frozen=True, allow_inf_nan=False
    )

    node: str = "node-1"
    run_dir: Path = Path("run")
    gpus: str = "nvml"
    """``nvml`` (real GPUs), ``sim:<profile>`` or a JSON snapshot file."""
    metrics_addr: str | None = None
    """``host:port`` for Prometheus ``/metrics``; None disables it."""
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    health_publish_s: Annotated[float, Field(gt=0)] = 30.0
    """How often a pool's unchanged probe outcome is shown again on ``poold.health.<pool>``
    (a change is shown at once; the pool itself gets every result directly)."""
    on_shutdown: Literal["stop", "leave"] = "stop"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    nats: NatsConfig = Field(default_factory=NatsConfig)
    ownership: OwnershipConfig = Field(default_factory=OwnershipConfig)
    pools: list[PoolConfig] = Field(default_factory=list)

    @field_validator("node")
    @classmethod
    def _valid_node(cls, value: str) -> str:
        if not ID_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid node id (^[a-z0-9][a-z0-9_-]{{0,62}}$)")
        return value

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[PoolConfig]) -> list[PoolConfig]:
        first: dict[str, int] = {}
        for index, pool in enumerate(pools):
            if pool.id in first:
                raise ValueError(f"pools[{index}].id {pool.id!r} repeats pools[{first[pool.id]}].id")
            first[pool.id] = index
        return pools

    @field_validator("gpus")
    @classmethod
    def _known_gpu_source(cls, value: str) -> str:
        if value == "nvml":
            return value
        if value.startswith(SIM_PREFIX):
            known = list_profiles()
            if value[len(SIM_PREFIX) :] not in known:
                raise ValueError(f"unknown simulated GPU profile {value!r}; known: {', '.join(known)}")
            return value
        if not Path(value).is_file():
            raise ValueError(f"{value!r} is neither 'nvml', 'sim:<profile>' nor a readable GPU snapshot file")
        return value

    @field_validator("run_dir")
    @classmethod
    def _run_dir_usable(cls, value: Path) -> Path:
        # Only what can be known without creating anything: the daemon makes the folder at start.
        for path in (value, *value.parents):
            if path.exists():
                if not path.is_dir():
                    raise ValueError(f"{str(path)!r} exists and is not a directory")
                break
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _valid_metrics_addr(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() for c in host):
            raise ValueError(f"{value!r} is not host:port (port 0-65535, e.g. '127.0.0.1:9464')")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (init kwargs carry the file's content).
        return (env_settings, init_settings)

    def definitions(self) -> list[PoolDefinition]:
        return [pool.definition() for pool in self.pools]


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/mapping")
    return data


def _format(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "(root)"
        # pydantic prefixes our own ValueError texts with "Value error, ": the key already says where.
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | None = None, **overrides: Any) -> DaemonConfig:
    """Read and validate the configuration; raises :class:`ConfigError` naming file and key."""
    data = _read_file(path) if path is not None else {}
    data.update(overrides)
    try:
        return DaemonConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format(str(path) if path else "(config)", exc)) from None
