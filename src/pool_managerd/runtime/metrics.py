"""Prometheus metrics. Labels are bounded: pools are the configured ones, triggers and states
come from the lifecycle table, verbs and outcomes from the wire contract."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.messages import StateChanged
from pool_managerd.core.pool_model import Outcome
from pool_managerd.core.registry import Entry
from pool_managerd.core.table import STATES


class MetricsAddressUnusable(PoolManagerError):
    """``metrics_addr`` cannot be listened on (in use, not this host's, no permission)."""

    code = "metrics_addr_unusable"


def check_metrics_addr(addr: str) -> None:
    """Bind ``host:port`` once and let go, so a daemon that could never serve its metrics says so
    before it connects or touches a pool (a race with another process remains; serve() reports it)."""
    host, _, port = addr.rpartition(":")
    host = host or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except (OSError, ValueError) as exc:
        raise MetricsAddressUnusable(f"metrics_addr {addr!r} cannot be listened on: {exc}") from None


class Metrics:
    """Every metric of one daemon, in its own registry (several daemons may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pool_state = Gauge("poold_pool_state", "1 for the pool's current state", ["pool", "state"], registry=r)
        self.transitions = Counter(
            "poold_transitions_total", "Lifecycle transitions taken", ["pool", "trigger", "dst"], registry=r
        )
        self.restarts = Counter("poold_restarts_total", "Restarts scheduled by supervision", ["pool"], registry=r)
        self.probe_latency = Histogram(
            "poold_health_probe_latency_seconds",
            "Health probe round trip",
            ["pool"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.leases = Gauge("poold_leases_active", "Leases held", ["pool"], registry=r)
        self.vram = Gauge("poold_pool_vram_bytes", "VRAM budgeted to the pool's placement", ["pool"], registry=r)
        self.vram_held = Gauge(
            "poold_pool_vram_held_bytes",
            "VRAM the pool's engine holds per GPU, as read when it was verified after launch",
            ["pool", "gpu"],
            registry=r,
        )
        self.backlog = Gauge("poold_event_backlog", "Events waiting for a JetStream ack", registry=r)
        self.commands = Counter("poold_commands_total", "Commands answered", ["verb", "outcome"], registry=r)
        self.refused = Counter("poold_commands_refused_total", "Commands refused, by rejection code", ["code"],
                               registry=r)  # fmt: skip
        self.log_corrupt = Gauge(
            "poold_pool_log_corrupt", "1 while the pool is quarantined by foreign messages", ["pool"], registry=r
        )
        self.audit_dropped = Counter(
            "poold_audit_dropped_total", "Refusals not written to the audit stream (buffer full)", registry=r
        )
        self.health_ignored = Counter(
            "poold_health_reports_ignored_total", "Health reports for pools this daemon does not own", registry=r
        )
        self.health_outside_dropped = Counter(
            "poold_health_outside_dropped_total",
            "Outside health reports dropped because the pool's outside lane was full (its own prober never is)",
            registry=r,
        )
        self.events = Counter("poold_events_total", "Events produced", ["pool"], registry=r)
        self._server: Any = None
        self._pools: dict[str, _PoolMetrics] = {}

    def observe(self, entry: Entry, outcome: Outcome) -> None:
        """Update the pool's metrics after one lifecycle step."""
        pool = entry.pool
        for event in outcome.events:
            body = event.body
            if isinstance(body, StateChanged):
                self.transitions.labels(pool, body.trigger, body.dst).inc()
                if body.dst == "restarting":
                    self.restarts.labels(pool).inc()
        if outcome.events:
            self.events.labels(pool).inc(len(outcome.events))
        # Every probe is a step: the label lookups are done once per pool and the gauges set only
        # when they change (a thousand pools probed every second made this a tenth of the loop).
        kids = self._kids(pool)
        shown = (entry.state, entry.active_leases, sum(entry.placement.budgets) if entry.placement else 0)
        if kids.shown != shown:
            for state, gauge in kids.states.items():
                gauge.set(1.0 if entry.state == state else 0.0)
            kids.leases.set(shown[1])
            kids.vram.set(shown[2])
            kids.shown = shown
        if kids.held != entry.vram_held:
            for gpu in set(kids.held) - set(entry.vram_held):
                self.vram_held.remove(pool, gpu)
            for gpu, held in entry.vram_held.items():
                self.vram_held.labels(pool, gpu).set(held)
            kids.held = dict(entry.vram_held)
        latency = entry.perf_hints.get("probe_latency_ms")
        if latency is not None:
            kids.latency.observe(latency / 1000.0)

    def probe_observed(self, pool: str, latency_ms: float) -> None:
        """One probe that needed no step (its pool's other metrics cannot have changed)."""
        self._kids(pool).latency.observe(latency_ms / 1000.0)

    def _kids(self, pool: str) -> _PoolMetrics:
        kids = self._pools.get(pool)
        if kids is None:
            kids = self._pools[pool] = _PoolMetrics(
                states={state: self.pool_state.labels(pool, state) for state in STATES},
                leases=self.leases.labels(pool),
                vram=self.vram.labels(pool),
                latency=self.probe_latency.labels(pool),
            )
        return kids

    def serve(self, addr: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks one); returns the bound address."""
        host, _, port = addr.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass(slots=True)
class _PoolMetrics:
    """One pool's labelled children, looked up once, and the values last set."""

    states: dict[str, Any]
    leases: Any
    vram: Any
    latency: Any
    shown: tuple[object, ...] | None = None
    held: dict[str, int] = field(default_factory=dict)
