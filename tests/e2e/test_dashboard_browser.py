"""The web dashboard in a real browser (Debian's headless Chromium driven by Playwright) against a
real nats-server with its websocket listener and a real daemon running fake engines.

Every wait is on something the page shows (a selector with a deadline), never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from playwright.async_api import TimeoutError as PlaywrightTimeout
from playwright.async_api import async_playwright

from conftest import FAKE, StartDaemon
from pool_managerd import accounts
from pool_managerd.adapters.embedded_nats import NatsServer
from pool_managerd.adapters.eventlog.snapshots import SnapshotStore
from pool_managerd.adapters.eventlog.stream import ensure_stream
from pool_managerd.client import PoolClient
from pool_managerd.config import load_config
from pool_managerd.contract.messages import REPLY_DECODER, Accepted, GpuClearReply, PoolSnapshot, StatusReply, encode
from pool_managerd.contract.subjects import Subjects
from pool_managerd.dashboard import DashboardServer, PageConfig
from pool_managerd.runtime.daemon import Daemon

CHROMIUM = os.environ.get("POOL_MANAGERD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORDS = {"daemon": "daemonpw1", "admin": "adminpw1", "operator": "operatorpw1", "viewer": "viewerpw1"}
"""The shipped users and permissions (``accounts.server_config``) with these passwords."""
WAIT_MS = 15_000
DAEMON_NATS = {"user": "daemon", "password": PASSWORDS["daemon"], "inbox_prefix": accounts.inbox_prefix("daemon"),
               "reconnect_wait_s": 0.1}  # fmt: skip
"""How the daemon connects to the secured server: as the shipped daemon user."""


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium; Playwright never downloads a browser of its own."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own with a websocket listener and the shipped users."""
    with NatsServer(store_dir=tmp_path / "nats", websocket_port=0, config=accounts.server_config(PASSWORDS)) as server:
        yield server


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with a websocket listener and no authentication (like the demo's)."""
    with NatsServer(store_dir=tmp_path / "nats-open", websocket_port=0) as server:
        yield server


@pytest.fixture
def dashboard_for() -> Iterator[Callable[[NatsServer], DashboardServer]]:
    servers: list[DashboardServer] = []

    def make(nats_server: NatsServer) -> DashboardServer:
        assert nats_server.ws_url is not None
        server = DashboardServer(PageConfig(server=nats_server.ws_url)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


async def operator_client(nats_connect: Any, server: NatsServer) -> NATS:
    client: NATS = await nats_connect(server.url, user="operator", password=PASSWORDS["operator"],
                                      inbox_prefix=accounts.inbox_prefix("operator"))  # fmt: skip
    return client


async def request(nc: NATS, subject: str, payload: dict[str, Any] | None = None) -> Any:
    msg = await nc.request(subject, json.dumps(payload).encode() if payload is not None else b"", timeout=10)
    return REPLY_DECODER.decode(msg.data)


async def open_page(browser: Any, dashboard: DashboardServer, user: str | None = None) -> Any:
    """A fresh page on the dashboard, logged in as ``user`` (None: the open server's autoconnect)."""
    # The page's CSP forbids eval; the test's own probes (wait_for_function) need it.
    context = await browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.errors = errors
    if user is None:
        await page.goto(dashboard.url)
    else:
        await page.goto(f"{dashboard.url}?user={user}")
        await page.wait_for_selector('body[data-booted="1"]')
        await page.fill("#login-pass", PASSWORDS[user])
        await page.click("#login-connect")
    try:
        await page.wait_for_selector('#conn[data-state="live"]', timeout=WAIT_MS)
        await page.wait_for_selector('body[data-synced="1"]', timeout=WAIT_MS)
    except PlaywrightTimeout:
        shown = await page.inner_text("header") + " / " + await page.inner_text("#login-error")
        pytest.fail(f"the page did not come live: {shown}; console: {console[-10:]}")
    return page


def row(pool: str, state: str | None = None) -> str:
    return f'#pools tr[data-pool="{pool}"]' + (f'[data-state="{state}"]' if state else "")


async def record_states(page: Any, pool: str) -> None:
    """Record every state the pool's row shows, as it changes (a MutationObserver in the page)."""
    await page.evaluate(
        """(pool) => {
            const tr = document.querySelector(`#pools tr[data-pool="${pool}"]`);
            window.__seen = [tr.dataset.state];
            new MutationObserver(() => {
                if (window.__seen.at(-1) !== tr.dataset.state) window.__seen.push(tr.dataset.state);
            }).observe(tr, { attributes: true, attributeFilter: ["data-state"] });
        }""",
        pool,
    )


async def send_from_page(page: Any, verb: str, deadline_s: float | None = None) -> None:
    await page.click(f'.commands button[data-verb="{verb}"]')
    await page.wait_for_selector("#confirm[open]", timeout=WAIT_MS)
    if deadline_s is not None:
        await page.fill("#confirm-deadline", str(deadline_s))
    await page.click("#confirm-ok")


async def test_the_table_follows_a_preload_a_crash_and_a_drain_with_a_lease_held(
    browser: Any, secured_server: NatsServer, start_daemon: StartDaemon, dashboard_for: Any, nats_connect: Any
) -> None:
    pools = [
        {"id": "chat", **FAKE, "slots": 2, "restart": {"initial_s": 1.0}},
        {"id": "embed", **FAKE, "model": "bge-large"},
    ]
    daemon = await start_daemon(secured_server.url, pools=pools, nats_options=DAEMON_NATS)
    page = await open_page(browser, dashboard_for(secured_server), user="operator")
    for pool in ("chat", "embed"):
        await page.wait_for_selector(row(pool, "unready"), timeout=WAIT_MS)
    await page.wait_for_selector('#nodes tr[data-node="node-a"][data-status="live"]', timeout=WAIT_MS)
    assert "SIMULATED" in await page.inner_text('#nodes tr[data-node="node-a"]')

    # A preload from the page, behind its confirmation.
    await page.click(row("chat"))
    await send_from_page(page, "preload")
    await page.wait_for_selector('#cmd-result[data-outcome="accepted"]', timeout=WAIT_MS)
    await page.wait_for_selector(row("chat", "ready"), timeout=WAIT_MS)
    assert await page.inner_text(f"{row('chat')} td.c-gpus") == "1"
    await page.wait_for_selector('#gpus .seg[data-pool="chat"]', timeout=WAIT_MS)

    # A crash: the row passes through restarting and comes back to ready.
    nc = await operator_client(nats_connect, secured_server)
    status = await request(nc, "poold.cmd.chat.status")
    assert isinstance(status, StatusReply) and status.pool.engine is not None
    await record_states(page, "chat")
    os.kill(status.pool.engine.pid, signal.SIGKILL)
    await page.wait_for_function("window.__seen.includes('restarting') && window.__seen.at(-1) === 'ready'",
                                 timeout=WAIT_MS)  # fmt: skip
    assert await page.inner_text(f"{row('chat')} td.c-restarts") == "1"
    # The timeline is rebuilt from the pool's events with the published lifecycle table.
    await page.wait_for_function(
        "document.querySelector('#timeline-legend').textContent.endsWith("
        "'unready → preloading → ready → restarting → preloading → ready')",
        timeout=WAIT_MS,
    )
    assert "not in the table" not in await page.inner_text("#timeline-legend")
    assert "backoff_scheduled" in await page.inner_text("#pool-events")
    # The fleet tail filters by event type (and pool, node).
    await page.fill("#tail-type", "backoff")
    await page.wait_for_function(
        "[...document.querySelectorAll('#tail tbody tr')].every(r => r.dataset.type === 'backoff_scheduled')"
        " && document.querySelectorAll('#tail tbody tr').length === 1",
    )
    await page.fill("#tail-type", "")
    await page.fill("#tail-node", "node-a")
    await page.fill("#tail-pool", "chat")
    await page.wait_for_function(
        "[...document.querySelectorAll('#tail tbody tr')].every(r => r.dataset.pool === 'chat')"
        " && document.querySelectorAll('#tail tbody tr').length >= 8",
    )

    # A drain while a client holds a lease: draining with 1/2 leases until it is released.
    lease = await request(nc, "poold.cmd.chat.lease", {"command_id": uuid.uuid4().hex, "ttl_s": 60})
    assert isinstance(lease, Accepted) and lease.lease_id
    await page.wait_for_function(f"document.querySelector('{row('chat')} td.c-leases').textContent === '1/2'",
                                 timeout=WAIT_MS)  # fmt: skip
    await send_from_page(page, "drain", deadline_s=30)
    await page.wait_for_selector(row("chat", "draining"), timeout=WAIT_MS)
    assert await page.inner_text(f"{row('chat')} td.c-leases") == "1/2"
    assert "now draining" in await page.inner_text("#cmd-result")
    await request(nc, "poold.cmd.chat.release", {"command_id": uuid.uuid4().hex, "lease_id": lease.lease_id})
    await page.wait_for_selector(row("chat", "unready"), timeout=WAIT_MS)
    assert await page.inner_text(f"{row('embed')} .state") == "unready"  # the other pool was never touched
    assert daemon.ready.is_set()
    assert page.errors == []


async def test_a_viewers_drain_is_refused_visibly_and_changes_nothing(
    browser: Any, secured_server: NatsServer, start_daemon: StartDaemon, dashboard_for: Any, nats_connect: Any
) -> None:
    await start_daemon(secured_server.url, pools=[{"id": "chat", **FAKE}], nats_options=DAEMON_NATS)
    nc = await operator_client(nats_connect, secured_server)
    reply = await request(nc, "poold.cmd.chat.preload", {"command_id": uuid.uuid4().hex})
    assert isinstance(reply, Accepted)
    page = await open_page(browser, dashboard_for(secured_server), user="viewer")
    await page.wait_for_selector(row("chat", "ready"), timeout=WAIT_MS)
    before = await request(nc, "poold.cmd.chat.status")

    await page.click(row("chat"))
    await send_from_page(page, "drain")
    await page.wait_for_selector('#cmd-result[data-outcome="refused"]', timeout=WAIT_MS)
    text = await page.inner_text("#cmd-result")
    assert "refused by the NATS server" in text and "viewer" in text and "poold.cmd.chat.drain" in text
    assert "Nothing was changed" in text
    assert await page.is_visible("#cmd-result")

    after = await request(nc, "poold.cmd.chat.status")
    assert isinstance(before, StatusReply) and isinstance(after, StatusReply)
    assert (after.pool.state, after.pool.seq) == ("ready", before.pool.seq)
    assert await page.get_attribute(row("chat"), "data-state") == "ready"
    assert page.errors == []


async def test_the_page_recovers_after_the_nats_server_restarts(
    browser: Any, secured_server: NatsServer, start_daemon: StartDaemon, dashboard_for: Any, nats_connect: Any
) -> None:
    await start_daemon(secured_server.url, pools=[{"id": "chat", **FAKE}], nats_options=DAEMON_NATS)
    page = await open_page(browser, dashboard_for(secured_server), user="operator")
    await page.wait_for_selector(row("chat", "unready"), timeout=WAIT_MS)

    secured_server.kill()
    await page.wait_for_selector('#conn[data-state="reconnecting"]', timeout=WAIT_MS)
    await secured_server.astart()
    await page.wait_for_selector('#conn[data-state="live"]', timeout=WAIT_MS)

    # Events after the restart reach the table and the tail: the watches came back.
    nc = await operator_client(nats_connect, secured_server)
    reply = None
    for _ in range(100):  # the daemon reconnects on its own schedule; each try has its own deadline
        try:
            reply = await request(nc, "poold.cmd.chat.preload", {"command_id": "after-restart"})
            break
        except Exception:
            await asyncio.sleep(0.1)  # ok: a bounded retry of a request, not a wait for a state
    assert isinstance(reply, Accepted), reply
    await page.wait_for_selector(row("chat", "ready"), timeout=WAIT_MS)
    await page.wait_for_selector('#tail tr[data-pool="chat"][data-type="state_changed"]', timeout=WAIT_MS)
    assert page.errors == []


def snapshot(i: int, state: str = "ready") -> PoolSnapshot:
    return PoolSnapshot(pool=f"p{i:04d}", node=f"node-{i % 10}", state=state, seq=2, model=f"model-{i % 7}",  # type: ignore[arg-type]
                        device_mask=["0"], slots_total=4, active_leases=i % 5 and 1, restarts=i % 3,
                        simulated=True, updated_at=0.0, last_event="engine_ready")  # fmt: skip


async def test_a_thousand_simulated_pools_render_filter_sort_and_update(
    browser: Any, open_server: NatsServer, dashboard_for: Any, nats_connect: Any
) -> None:
    nc = await nats_connect(open_server.url)
    js = nc.jetstream()
    await ensure_stream(js, Subjects())
    store = await SnapshotStore.open(js)
    kv = store.kv
    await asyncio.gather(*(kv.put(f"p{i:04d}", encode(snapshot(i))) for i in range(1000)))
    # One pool's history breaks the table: the timeline says so rather than drawing it quietly.
    for seq, (trigger, src, dst) in enumerate([("preload", "unready", "preloading"), ("drain", "unready", "ready")], 1):
        body = {"type": "state_changed", "trigger": trigger, "src": src, "dst": dst}
        event = {"v": 1, "seq": seq, "ts": 1000.0 + seq, "node": "node-1", "pool": "p0001", "body": body}
        await js.publish("poold.evt.p0001.state_changed", json.dumps(event).encode())

    page = await open_page(browser, dashboard_for(open_server))
    await page.wait_for_selector('#pool-count[data-total="1000"][data-shown="1000"]', timeout=WAIT_MS)
    assert await page.locator("#pools tbody tr").count() == 1000
    assert await page.inner_text("#pools tbody tr:first-child td.c-pool") == "p0000"

    await page.fill("#pool-filter", "p0999")
    await page.wait_for_selector('#pool-count[data-shown="1"]', timeout=WAIT_MS)
    assert await page.locator("#pools tbody tr:not([hidden])").count() == 1
    await page.fill("#pool-filter", "")
    await page.wait_for_selector('#pool-count[data-shown="1000"]', timeout=WAIT_MS)
    await page.click('#pools th[data-key="pool"]')  # second click on the sorted column: descending
    await page.wait_for_function("document.querySelector('#pools tbody tr td.c-pool').textContent === 'p0999'",
                                 timeout=WAIT_MS)  # fmt: skip

    await kv.put("p0500", encode(snapshot(500, state="failed")))
    await page.wait_for_selector(row("p0500", "failed"), timeout=WAIT_MS)
    await page.select_option("#state-filter", "failed")
    await page.wait_for_selector('#pool-count[data-shown="1"]', timeout=WAIT_MS)
    await kv.delete("p0500")
    await page.wait_for_selector('#pool-count[data-total="999"]', timeout=WAIT_MS)

    await page.select_option("#state-filter", "")
    await page.click(row("p0001"))
    await page.wait_for_function(
        "document.querySelector('#timeline-legend').textContent.includes('1 transition(s) not in the table')",
        timeout=WAIT_MS,
    )
    assert await page.locator("#timeline .seg.illegal").count() == 1
    assert page.errors == []


async def test_the_page_served_with_run_dir_credentials_connects_to_the_embedded_server_as_that_user(
    browser: Any, tmp_path: Path
) -> None:
    config = load_config(None, node="node-e", run_dir=tmp_path / "run", gpus="sim:hetero-24g-48g",
                         heartbeat_s=5.0, nats={"urls": []}, pools=[{"id": "chat", **FAKE}])  # fmt: skip
    daemon = Daemon(config)
    await daemon.start()
    dashboard = None
    try:
        assert daemon.ws_url is not None
        creds = accounts.load_credentials(tmp_path / "run", "viewer")
        assert creds.websocket_url == daemon.ws_url
        page_config = PageConfig(server=daemon.ws_url, user=creds.user, password=creds.password,
                                 inbox_prefix=creds.inbox_prefix)  # fmt: skip
        dashboard = DashboardServer(page_config).start()
        page = await open_page(browser, dashboard)  # no form: the served credentials connect
        await page.wait_for_selector(row("chat", "unready"))
        await page.wait_for_selector('#nodes tr[data-node="node-e"][data-status="live"]')
        assert "as viewer" in await page.inner_text("#conn-detail")
        # The password is used for the connection and kept nowhere the page's scripts can read.
        assert await page.evaluate("window.__poold.config.password") is None
        assert page.errors == []
    finally:
        if dashboard is not None:
            dashboard.stop()
        await daemon.stop()


async def test_a_gpu_fault_shows_on_its_gpu_and_in_the_tail_until_it_is_cleared(
    browser: Any, secured_server: NatsServer, start_daemon: StartDaemon, dashboard_for: Any, nats_connect: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    gpu1 = "GPU-a6000ce1-0000-4000-8000-000000000048"  # the 48 GB device of sim:hetero-24g-48g
    await start_daemon(secured_server.url, pools=[{"id": "chat", **FAKE, "device_mask": "1"}], nats_options=DAEMON_NATS)
    page = await open_page(browser, dashboard_for(secured_server), user="operator")
    await page.wait_for_selector(row("chat", "unready"), timeout=WAIT_MS)
    gpu = f'#gpus .gpu[data-uuid="{gpu1}"]'
    await page.wait_for_selector(f'{gpu}[data-healthy="true"][data-held="0"]', timeout=WAIT_MS)

    # Ready and verified: what its engine holds on the device shows beside the budget.
    await page.click(row("chat"))
    await send_from_page(page, "preload")
    await page.wait_for_selector(row("chat", "ready"), timeout=WAIT_MS)
    await page.wait_for_function(f"Number(document.querySelector('{gpu}').dataset.held) > 0", timeout=WAIT_MS)
    assert "held" in await page.inner_text(gpu)
    assert "gpu_verified" in await page.inner_text("#pool-events")

    # An Xid 79 on that device (the simulated driver's fault file): the GPU is marked, the tail says
    # what happened and to which pool, and the pool on it stops.
    with (tmp_path / "node-a" / "sim-gpu" / "faults.jsonl").open("a") as f:
        f.write(json.dumps({"uuid": gpu1, "xid": 79}) + "\n")
    await page.wait_for_selector(f'{gpu}[data-healthy="false"]', timeout=WAIT_MS)
    assert "UNHEALTHY: Xid 79" in await page.inner_text(gpu)
    await page.wait_for_selector(row("chat", "unready"), timeout=WAIT_MS)
    fault_row = '#tail tbody tr[data-type="gpu_fault"]'
    await page.wait_for_selector(fault_row, timeout=WAIT_MS)
    assert "Xid 79: stop, stop (chat)" in await page.inner_text(fault_row)

    # Cleared by an operator: healthy again, and the tail says so.
    nc = await operator_client(nats_connect, secured_server)
    cleared = await PoolClient(nc).gpu_clear("node-a", gpu1)
    assert isinstance(cleared, GpuClearReply) and cleared.cleared
    await page.wait_for_selector(f'{gpu}[data-healthy="true"]', timeout=WAIT_MS)
    await page.wait_for_selector('#tail tbody tr[data-type="gpu_cleared"]', timeout=WAIT_MS)
    assert page.errors == []
