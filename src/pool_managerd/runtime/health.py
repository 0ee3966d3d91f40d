"""Health in and out on ``poold.health.<pool>``.

Out: the daemon's own prober results, shown to observers (the pool already has them). In:
reports from outside, validated and bounded, that may at most count as a failed probe, and only
for a pool whose configuration asks for that."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pool_managerd.contract.errors import PoolManagerError
from pool_managerd.contract.limits import json_problem
from pool_managerd.contract.messages import HEALTH_DECODER, HealthReport, encode
from pool_managerd.contract.subjects import Subjects, validate_id
from pool_managerd.runtime.metrics import Metrics
from pool_managerd.runtime.pools import PoolRuntime
from pool_managerd.runtime.tasks import BackgroundTasks

log = logging.getLogger(__name__)

ORIGIN_HEADER = "Poold-Node"
"""Header naming the node whose prober published a health report; the daemon skips its own."""


class HealthRelay:
    """Publishes this node's probe results and takes in outside health reports.

    ``nc()`` and ``runtime()`` are read at each message (the daemon creates them during start-up);
    ``external`` names the pools whose configuration accepts outside reports."""

    def __init__(
        self,
        *,
        node: str,
        subjects: Subjects,
        metrics: Metrics,
        tasks: BackgroundTasks,
        publish_s: float,
        external: frozenset[str],
        nc: Callable[[], NATS | None],
        runtime: Callable[[], PoolRuntime | None],
    ) -> None:
        self.node = node
        self.subjects = subjects
        self.metrics = metrics
        self.tasks = tasks
        self._publish_s = publish_s
        self._external_health = external
        self._nc = nc
        self._runtime = runtime
        self._health_shown: dict[str, tuple[tuple[object, ...], float]] = {}

    def publish(self, report: HealthReport) -> None:
        """Show our prober's results to observers on ``poold.health.<pool>``: when the outcome
        changes, else at most once per ``health_publish_s`` per pool. The pool already has the
        result (the prober feeds it directly), so a healthy probe costs no NATS message."""
        nc = self._nc()
        if nc is None or not nc.is_connected:
            return
        key = (report.ok, report.loading, report.status, report.error, report.engine_pid)
        now = time.monotonic()
        last = self._health_shown.get(report.pool)
        if last is not None and last[0] == key and now - last[1] < self._publish_s:
            return
        self._health_shown[report.pool] = (key, now)
        self.tasks.start(
            nc.publish(self.subjects.health(report.pool), encode(report), headers={ORIGIN_HEADER: self.node}),
            "health-pub",
        )

    async def on_message(self, msg: Msg) -> None:
        """One report from ``poold.health.>``: ours are skipped, bad ones counted and dropped."""
        runtime = self._runtime()
        if runtime is None:
            return
        if msg.headers and msg.headers.get(ORIGIN_HEADER) == self.node:
            return  # our own prober's, shown to observers: the pool had it first
        try:
            pool = self.subjects.parse_health(msg.subject)
            problem = json_problem(msg.data)
            if problem is not None:
                raise msgspec.DecodeError(problem[1])
            report = HEALTH_DECODER.decode(msg.data)
            validate_id(report.pool, "pool")
        except (PoolManagerError, msgspec.DecodeError, RecursionError) as exc:
            log.warning("ignored malformed health report on %s: %s", msg.subject, exc)
            self.metrics.health_ignored.inc()
            return
        # Readiness comes from our own prober only; an outside report may at most count as a failed
        # probe, and only for a pool whose configuration asks for that.
        if report.pool != pool or report.ok or pool not in self._external_health:
            self.metrics.health_ignored.inc()
            return
        if not runtime.health_report(report):
            self.metrics.health_ignored.inc()
            self.metrics.health_outside_dropped.inc()
