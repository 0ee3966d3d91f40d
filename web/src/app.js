// The pool-managerd dashboard: a NATS client in the browser that reads only the published
// contract (KV bucket watch, the event stream through ordered consumers, node heartbeats, $SRV
// discovery, request/reply commands). Nothing here talks to the daemon any other way.
import { wsconnect, errors, Empty } from "@nats-io/nats-core";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";

const STREAM = "POOLD_EVENTS";
const BUCKET = "poold_pools";
const SERVICE = "pool-managerd";
const TAIL_MAX = 500; // lines kept in the fleet tail
const TAIL_HISTORY_S = 15 * 60; // how far back the tail starts
const POOL_EVENTS_MAX = 2000; // events kept for the selected pool
const NODE_SILENT_PERIODS = 3; // as the daemon judges another node's liveness
const COMMAND_TIMEOUT_MS = 10000;
const STATES = ["unready", "preloading", "ready", "draining", "restarting", "failed"];

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
};

// ------------------------------------------------------------------------------------ state

const params = new URLSearchParams(location.search);
const state = {
  config: { server: "", prefix: "poold", user: "" },
  lifecycle: null,
  rows: new Set(), // "trigger|source|dest"
  nc: null,
  connection: "idle",
  lastEventTs: null,
  pools: new Map(), // pool -> { snap, tr, cells, lastKey }
  nodes: new Map(), // node -> { hb, period, simulated, version, source, lastType, lastTs }
  inventory: new Map(), // node -> GpuSnapshot
  tail: [],
  selected: null,
  poolEvents: [],
  watchers: [], // things with stop()
  selectedWatcher: null,
  sort: { key: "pool", dir: 1 },
  dirty: new Set(),
  orderDirty: true,
  renderQueued: false,
  synced: false,
  generation: 0,
  timings: {}, // performance.now() of boot, connect and first full render, for benchmarks
};
window.__poold = state; // for tests and benchmarks: read-only inspection

const now = () => Date.now() / 1000;
const age = (ts) => {
  if (ts == null) return "-";
  const s = Math.max(0, now() - ts);
  if (s < 1) return "now";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
};
const gib = (b) => `${(b / 2 ** 30).toFixed(1)} GiB`;
const decode = (data) => JSON.parse(new TextDecoder().decode(data));
const encode = (obj) => new TextEncoder().encode(JSON.stringify(obj));
const commandId = () =>
  (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`).replaceAll("-", "");

// ------------------------------------------------------------------------------ connection

function setConnection(kind, detail = "") {
  state.connection = kind;
  const c = $("#conn");
  c.dataset.state = kind;
  c.textContent = { idle: "not connected", connecting: "connecting", live: "live",
    reconnecting: "reconnecting", closed: "disconnected", error: "error" }[kind] || kind;
  $("#conn-detail").textContent = detail;
  document.body.dataset.conn = kind;
}

async function connect(server, user, pass, inboxPrefix) {
  await disconnect();
  forget();
  const gen = ++state.generation;
  setConnection("connecting", server);
  $("#login-error").textContent = "";
  const opts = {
    servers: server,
    name: "pool-managerd-dashboard",
    maxReconnectAttempts: -1,
    reconnectTimeWait: 500,
    waitOnFirstConnect: false,
    timeout: 5000,
  };
  if (user) {
    opts.user = user;
    opts.pass = pass;
    // Replies come only on the user's own inbox prefix (the shipped permissions allow no other).
    opts.inboxPrefix = inboxPrefix || `_INBOX.${user}`;
  }
  let nc;
  state.timings.connecting = performance.now();
  try {
    nc = await wsconnect(opts);
    state.timings.connected = performance.now();
  } catch (err) {
    if (gen !== state.generation) return;
    setConnection("error", server);
    $("#login-error").textContent = `cannot connect to ${server}: ${err.message}`;
    $("#login").hidden = false;
    return;
  }
  if (gen !== state.generation) {
    await nc.close();
    return;
  }
  state.nc = nc;
  state.config.user = user || "";
  $("#login").hidden = true;
  setConnection("live", `${server}${user ? ` as ${user}` : ""}`);
  followStatus(nc, gen);
  nc.closed().then(() => {
    if (gen === state.generation) setConnection("closed", server);
  });
  startWatchers(nc, gen);
}

// Another server (or user) is another fleet: nothing seen on the previous one stays on screen.
function forget() {
  state.pools.clear();
  state.nodes.clear();
  state.inventory.clear();
  state.tail = [];
  state.dirty.clear();
  state.lastEventTs = null;
  state.synced = false;
  delete document.body.dataset.synced;
  kvResume = tailNextSeq = nodesNextSeq = 0;
  $("#pools tbody").replaceChildren();
  state.orderDirty = filterDirty = tailDirty = nodesDirty = gpusDirty = true;
  scheduleRender();
}

async function disconnect() {
  state.generation++;
  stopWatchers();
  if (state.nc) {
    const nc = state.nc;
    state.nc = null;
    await nc.close().catch(() => {});
  }
}

async function followStatus(nc, gen) {
  for await (const s of nc.status()) {
    if (gen !== state.generation) return;
    if (s.type === "disconnect" || s.type === "reconnecting" || s.type === "staleConnection") {
      if (state.connection !== "reconnecting") setConnection("reconnecting", "waiting for the NATS server");
    } else if (s.type === "reconnect") {
      setConnection("live", s.server);
      // Consumers and watches are created again from where they stopped: a restarted server may
      // have lost them, and a stale one would leave the screen quietly frozen.
      stopWatchers();
      startWatchers(nc, gen);
    }
  }
}

// ------------------------------------------------------------------------------- watchers

function stopWatchers() {
  for (const w of state.watchers) w.stop();
  state.watchers = [];
  if (state.selectedWatcher) {
    state.selectedWatcher.stop();
    state.selectedWatcher = null;
  }
}

// Runs `body(handle)` until stopped, retrying after failures (a stream not created yet, a
// server that went away) with a short pause.
function supervised(name, body) {
  const handle = { stopped: false, iter: null, stop() { this.stopped = true; this.iter?.stop(); } };
  (async () => {
    while (!handle.stopped) {
      try {
        await body(handle);
      } catch (err) {
        if (!handle.stopped) console.warn(`${name}: ${err.message}`);
      }
      if (!handle.stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  return handle;
}

function startWatchers(nc, gen) {
  const js = jetstream(nc);
  const p = state.config.prefix;
  state.watchers.push(
    supervised("kv", (h) => watchKv(nc, h)),
    supervised("tail", (h) => consumeTail(js, h, p)),
    supervised("nodes", (h) => consumeNodes(js, h, p)),
    discoveryLoop(nc, gen),
  );
  if (state.selected) selectPool(state.selected);
}

let kvResume = 0; // the next KV revision to read: a rewatch continues, never replays

async function watchKv(nc, handle) {
  const kv = await new Kvm(nc).open(BUCKET);
  state.timings.kvOpen ??= performance.now();
  const opts = kvResume ? { resumeFromRevision: kvResume } : {};
  if (!kvResume) {
    const status = await kv.status();
    if (status.values === 0) markSynced();
  }
  const iter = await kv.watch(opts);
  state.timings.kvWatch ??= performance.now();
  handle.iter = iter;
  if (handle.stopped) return iter.stop();
  for await (const e of iter) {
    kvResume = e.revision + 1;
    state.timings.kvFirst ??= performance.now();
    if (e.operation === "DEL" || e.operation === "PURGE") removePool(e.key);
    else {
      try {
        upsertPool(e.key, decode(e.value));
      } catch (err) {
        console.warn(`bad snapshot for ${e.key}: ${err.message}`);
      }
    }
    if (!state.synced && (e.delta === 0 || e.isUpdate)) markSynced();
  }
}

function markSynced() {
  state.timings.synced = performance.now();
  state.synced = true;
  document.body.dataset.synced = "1";
  scheduleRender();
}

let tailNextSeq = 0;

async function consumeTail(js, handle, prefix) {
  const opts = { filter_subjects: [`${prefix}.evt.>`, `${prefix}.node.*.evt.>`] };
  if (tailNextSeq) Object.assign(opts, { deliver_policy: "by_start_sequence", opt_start_seq: tailNextSeq });
  else Object.assign(opts, { deliver_policy: "by_start_time",
    opt_start_time: new Date(Date.now() - TAIL_HISTORY_S * 1000).toISOString() });
  const consumer = await js.consumers.get(STREAM, opts);
  const iter = await consumer.consume();
  handle.iter = iter;
  if (handle.stopped) return iter.stop();
  for await (const m of iter) {
    tailNextSeq = m.seq + 1;
    let event;
    try {
      event = m.json();
    } catch {
      continue;
    }
    onEvent(event);
  }
}

let nodesNextSeq = 0;

async function consumeNodes(js, handle, prefix) {
  // The last event of every node subject (heartbeat, daemon_started, ...) then live ones: a
  // silent node shows up as silent instead of missing.
  const opts = { filter_subjects: [`${prefix}.node.*.evt.>`] };
  if (nodesNextSeq) Object.assign(opts, { deliver_policy: "by_start_sequence", opt_start_seq: nodesNextSeq });
  else opts.deliver_policy = "last_per_subject";
  const consumer = await js.consumers.get(STREAM, opts);
  const iter = await consumer.consume();
  handle.iter = iter;
  if (handle.stopped) return iter.stop();
  for await (const m of iter) {
    nodesNextSeq = m.seq + 1;
    try {
      onNodeEvent(m.json());
    } catch {
      /* an unreadable message changes nothing */
    }
  }
}

function discoveryLoop(nc, gen) {
  const handle = { stopped: false, timer: null, stop() { this.stopped = true; clearTimeout(this.timer); } };
  const tick = async () => {
    if (handle.stopped || gen !== state.generation) return;
    try {
      const replies = await nc.requestMany(`$SRV.INFO.${SERVICE}`, Empty, { maxWait: 1500, strategy: "timer" });
      for await (const m of replies) {
        let info;
        try {
          info = m.json();
        } catch {
          continue;
        }
        const node = info?.metadata?.node;
        if (typeof node !== "string") continue;
        const n = nodeEntry(node);
        n.version = String(info.version ?? "");
        n.discovered = now();
        if (!state.inventory.has(node)) fetchInventory(node);
      }
      renderNodes();
    } catch (err) {
      console.warn(`discovery: ${err.message}`);
    }
    if (!handle.stopped) handle.timer = setTimeout(tick, 15000);
  };
  tick();
  return handle;
}

async function fetchInventory(node) {
  if (!state.nc) return;
  try {
    const m = await state.nc.request(`${state.config.prefix}.node.${node}.cmd.inventory`, encode({}),
      { timeout: 3000 });
    const reply = m.json();
    if (reply.type === "inventory") {
      state.inventory.set(node, reply.gpus);
      nodeEntry(node).source = reply.gpus.source;
      renderNodes();
      renderGpus();
    }
  } catch (err) {
    console.warn(`inventory of ${node}: ${err.message}`);
  }
}

// --------------------------------------------------------------------------------- events

function nodeEntry(node) {
  let n = state.nodes.get(node);
  if (!n) {
    n = { hb: null, period: null, simulated: null, version: "", source: "", lastType: "", lastTs: null };
    state.nodes.set(node, n);
  }
  return n;
}

function onNodeEvent(event) {
  if (event.pool || !event.node || !event.body) return;
  const n = nodeEntry(event.node);
  if (n.lastTs == null || event.ts >= n.lastTs) {
    n.lastTs = event.ts;
    n.lastType = event.body.type;
  }
  const body = event.body;
  if (body.type === "heartbeat") {
    n.hb = Math.max(n.hb ?? 0, event.ts);
    n.period = body.period_s ?? n.period;
    n.simulated = body.simulated;
  } else if (body.type === "daemon_started") {
    n.version = body.version;
    n.simulated = body.simulated;
    n.hb = Math.max(n.hb ?? 0, event.ts);
    fetchInventory(event.node);
  } else if (body.type === "daemon_stopping") {
    n.hb = n.hb ?? event.ts;
  } else if (body.type === "gpu_fault" || body.type === "gpu_cleared") {
    // The inventory says which devices are unhealthy and why; the event says it changed.
    fetchInventory(event.node);
  }
  renderNodes();
}

function onEvent(event) {
  if (typeof event !== "object" || !event?.body) return;
  state.lastEventTs = Math.max(state.lastEventTs ?? 0, event.ts);
  if (!event.pool) onNodeEvent(event);
  state.tail.push(event);
  if (state.tail.length > TAIL_MAX) state.tail.splice(0, state.tail.length - TAIL_MAX);
  tailDirty = true;
  scheduleRender();
}

// ---------------------------------------------------------------------------------- pools

const COLUMNS = ["pool", "node", "state", "model", "gpus", "leases", "restarts", "last_event", "age"];

function rowValues(snap) {
  return {
    pool: snap.pool,
    node: snap.node || "",
    state: snap.state || "unready",
    model: snap.model || "",
    gpus: (snap.device_mask || []).length,
    leases: `${snap.active_leases ?? 0}/${snap.slots_total ?? 0}`,
    restarts: snap.restarts ?? 0,
    last_event: snap.last_event || "",
    age: snap.updated_at || 0,
  };
}

function upsertPool(key, snap) {
  if (typeof snap !== "object" || !snap || typeof snap.pool !== "string") return;
  let entry = state.pools.get(key);
  if (!entry) {
    const tr = el("tr", { "data-pool": key });
    const cells = {};
    for (const c of COLUMNS) {
      cells[c] = el("td", { class: `c-${c}` });
      tr.append(cells[c]);
    }
    tr.addEventListener("click", () => selectPool(key));
    entry = { snap, tr, cells, values: null };
    state.pools.set(key, entry);
    state.orderDirty = true;
  }
  const prev = entry.snap;
  entry.snap = snap;
  if (prev.node !== snap.node || prev.placement !== snap.placement) gpusDirty = true;
  gpusDirty = gpusDirty || prev.state !== snap.state;
  state.dirty.add(key);
  if (snap.node && !state.nodes.has(snap.node)) {
    nodeEntry(snap.node);
    nodesDirty = true;
  }
  scheduleRender();
}

function removePool(key) {
  const entry = state.pools.get(key);
  if (!entry) return;
  entry.tr.remove();
  state.pools.delete(key);
  gpusDirty = true;
  filterDirty = true; // the counts change
  scheduleRender();
}

function paintRow(entry) {
  const v = rowValues(entry.snap);
  const old = entry.values || {};
  for (const c of COLUMNS) {
    if (old[c] === v[c] && c !== "age") continue;
    const cell = entry.cells[c];
    if (c === "state") {
      cell.replaceChildren(el("span", { class: `state st-${v.state}`, "data-state": v.state, text: v.state }));
    } else if (c === "age") {
      cell.dataset.ts = v.age;
      cell.textContent = age(v.age || null);
    } else {
      cell.textContent = String(v[c] === "" ? "-" : v[c]);
    }
    if (c === state.sort.key && old[c] !== v[c]) state.orderDirty = true;
  }
  entry.tr.dataset.state = v.state;
  entry.values = v;
}

function matches(entry) {
  const text = $("#pool-filter").value.trim().toLowerCase();
  const wanted = $("#state-filter").value;
  const v = entry.values;
  if (wanted && v.state !== wanted) return false;
  if (!text) return true;
  return [v.pool, v.model, v.node, v.state].some((s) => s.toLowerCase().includes(text));
}

function compare(a, b) {
  const k = state.sort.key;
  const x = a.values[k];
  const y = b.values[k];
  let r;
  if (k === "state") r = STATES.indexOf(x) - STATES.indexOf(y);
  else if (typeof x === "number") r = x - y;
  else r = String(x).localeCompare(String(y));
  return r * state.sort.dir || a.values.pool.localeCompare(b.values.pool);
}

let filterDirty = true;
let tailDirty = false;
let nodesDirty = false;
let gpusDirty = false;

function scheduleRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(render);
}

function render() {
  state.renderQueued = false;
  if (!state.synced) {
    // While the bucket's current values stream in, painting 1,000 rows per frame would compete
    // with reading them: count them, paint once the watch has caught up.
    $("#pool-count").textContent = `loading… ${state.pools.size}`;
    return;
  }
  for (const key of state.dirty) {
    const entry = state.pools.get(key);
    if (entry) paintRow(entry);
    if (key === state.selected) renderDetailHeader();
  }
  const changed = state.dirty.size > 0;
  state.dirty.clear();
  const tbody = $("#pools tbody");
  if (state.orderDirty) {
    const order = [...state.pools.values()].filter((e) => e.values).sort(compare);
    tbody.replaceChildren(...order.map((e) => e.tr));
    state.orderDirty = false;
    filterDirty = true;
  }
  if (filterDirty || changed) {
    let shown = 0;
    for (const entry of state.pools.values()) {
      if (!entry.values) continue;
      const ok = matches(entry);
      entry.tr.hidden = !ok;
      if (ok) shown++;
    }
    filterDirty = false;
    const total = state.pools.size;
    const count = $("#pool-count");
    count.textContent = shown === total ? `${total}` : `${shown} of ${total} shown`;
    count.dataset.total = total;
    count.dataset.shown = shown;
  }
  if (tailDirty) renderTail();
  if (nodesDirty) renderNodes();
  if (gpusDirty) renderGpus();
  if (state.timings.firstRender === undefined && state.pools.size) {
    state.timings.firstRender = performance.now();
    // When the frame with every row has been laid out and painted:
    requestAnimationFrame(() => setTimeout(() => { state.timings.firstPaint = performance.now(); }, 0));
  }
}

// ---------------------------------------------------------------------------------- nodes

function renderNodes() {
  nodesDirty = false;
  const poolsByNode = new Map();
  for (const e of state.pools.values()) {
    const n = e.snap.node || "";
    poolsByNode.set(n, (poolsByNode.get(n) || 0) + 1);
  }
  const rows = [...state.nodes.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([node, n]) => {
    const period = n.period || 10;
    const silent = n.hb == null || now() - n.hb > NODE_SILENT_PERIODS * period || n.lastType === "daemon_stopping";
    const status = silent ? (n.lastType === "daemon_stopping" ? "stopped" : "silent") : "live";
    const source = n.source || (n.simulated ? "simulated" : n.simulated === false ? "nvml" : "-");
    const sim = n.simulated ? el("span", { class: "sim", text: "SIMULATED" }) : "";
    return el("tr", { "data-node": node, "data-status": status },
      el("td", { text: node }),
      el("td", {}, el("span", { class: `node-${status}`, text: status })),
      el("td", { class: "age", "data-ts": n.hb ?? "", text: age(n.hb) }),
      el("td", { text: n.version || "-" }),
      el("td", {}, `${source} `, sim),
      el("td", { text: String(poolsByNode.get(node) || 0) }));
  });
  $("#nodes tbody").replaceChildren(...rows);
}

// ----------------------------------------------------------------------------------- GPUs

const HOLDS_GPU = new Set(["preloading", "ready", "draining"]);

function renderGpus() {
  gpusDirty = false;
  const budgets = new Map(); // uuid -> [{pool, bytes}]
  const held = new Map(); // uuid -> bytes the engines hold, as the post-launch check measured
  for (const e of state.pools.values()) {
    for (const [uuid, bytes] of Object.entries(e.snap.vram_held || {})) {
      if (HOLDS_GPU.has(e.snap.state)) held.set(uuid, (held.get(uuid) || 0) + bytes);
    }
    const pl = e.snap.placement;
    if (!pl || !HOLDS_GPU.has(e.snap.state)) continue;
    (pl.uuids || []).forEach((uuid, i) => {
      const list = budgets.get(uuid) || [];
      list.push({ pool: e.snap.pool, bytes: (pl.budgets || [])[i] || 0 });
      budgets.set(uuid, list);
    });
  }
  const blocks = [];
  for (const [node, inv] of [...state.inventory.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    for (const gpu of inv.gpus || []) {
      const total = gpu.memory_total || 1;
      const bar = el("div", { class: "bar", title: `${gib(gpu.memory_free)} free of ${gib(total)}` });
      let used = 0;
      for (const b of budgets.get(gpu.uuid) || []) {
        const seg = el("div", { class: "seg", "data-pool": b.pool, title: `${b.pool}: ${gib(b.bytes)}` }, b.pool);
        seg.style.width = `${(100 * b.bytes) / total}%`;
        used += b.bytes;
        bar.append(seg);
      }
      const healthy = gpu.healthy !== false;
      const holds = held.get(gpu.uuid) || 0;
      const label = `${node} GPU${gpu.index} ${gpu.name} · ${gib(total)} total · ${gib(gpu.memory_free)} free` +
        ` · ${gib(used)} budgeted · ${gib(holds)} held${inv.simulated ? " · SIMULATED" : ""}`;
      const fault = healthy ? "" : el("span", { class: "gpu-fault", text: `UNHEALTHY: ${gpu.fault || "fault"}` });
      blocks.push(el("div", { class: "gpu", "data-uuid": gpu.uuid, "data-healthy": String(healthy),
        "data-held": String(holds) }, el("div", {}, label, " ", fault), bar));
    }
  }
  $("#gpus").replaceChildren(...(blocks.length ? blocks : [el("span", { class: "muted", text: "no inventory yet" })]));
}

// ------------------------------------------------------------------------------------ tail

function describe(event) {
  const b = event.body;
  switch (b.type) {
    case "state_changed":
      return `${b.trigger}: ${b.src} → ${b.dst}${b.reason ? ` (${b.reason})` : ""}`;
    case "backoff_scheduled":
      return `restart ${b.attempt} in ${Number(b.delay_s).toFixed(2)} s: ${b.reason}`;
    case "preload_rejected":
      return `${b.code}: ${b.message}${(b.problems || []).map((p) => `; ${p.code}: ${p.message}`).join("")}`;
    case "command_rejected":
      return `${b.verb} rejected, ${b.code}: ${b.message}`;
    case "engine_spawned":
      return `pid ${b.pid} port ${b.port} CUDA_VISIBLE_DEVICES=${b.cuda_visible_devices}`;
    case "engine_exited":
      return `pid ${b.pid} exit ${b.exit_code ?? "-"}${b.signal ? ` signal ${b.signal}` : ""}${b.expected ? " (asked)" : ""}`;
    case "lease_granted":
      return `${b.lease_id} (${b.active} active)${b.holder ? ` for ${b.holder}` : ""}`;
    case "lease_released":
    case "lease_expired":
      return `${b.lease_id} (${b.active} active)`;
    case "restart_limit_reached":
    case "reload_rolled_back":
    case "pool_fenced":
    case "daemon_stopping":
      return b.reason;
    case "drain_forced":
      return `${b.leases_left} lease(s) left after ${b.deadline_s} s`;
    case "health_changed":
      return `live=${b.live} ready=${b.ready}`;
    case "heartbeat":
      return `${b.gpus} GPU(s), ${gib(b.memory_free)} free${b.simulated ? ", simulated" : ""}`;
    case "daemon_started":
      return `version ${b.version}, ${b.pools.length} pool(s)`;
    case "gpu_fault":
      return `${b.uuid} ${b.kind}${b.xid != null ? ` Xid ${b.xid}` : ""}: ${b.fault_class}, ${b.action}` +
        `${(b.pools || []).length ? ` (${b.pools.join(", ")})` : ""}${b.description ? `: ${b.description}` : ""}`;
    case "gpu_cleared":
      return `${b.uuid} cleared${b.fault ? ` (was ${b.fault})` : ""}`;
    case "gpu_verified":
      return b.ok
        ? `${gib(Object.values(b.held || {}).reduce((a, x) => a + x, 0))} held on ${Object.keys(b.held || {}).length} GPU(s)`
        : `${b.reason}: ${b.message}`;
    default:
      return "";
  }
}

const clock = (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour12: false });

function eventRow(event) {
  return el("tr", { "data-type": event.body.type, "data-pool": event.pool || "" },
    el("td", { class: "muted", text: clock(event.ts) }),
    el("td", { text: event.pool || `node ${event.node}` }),
    el("td", { text: `#${event.seq}` }),
    el("td", { class: `ev ev-${event.body.type}`, text: event.body.type }),
    el("td", { text: describe(event) }));
}

function renderTail() {
  tailDirty = false;
  const pool = $("#tail-pool").value.trim();
  const node = $("#tail-node").value.trim();
  const type = $("#tail-type").value.trim();
  const rows = [];
  for (let i = state.tail.length - 1; i >= 0 && rows.length < 200; i--) {
    const e = state.tail[i];
    if (pool && !(e.pool || "").includes(pool)) continue;
    if (node && !(e.node || "").includes(node)) continue;
    if (type && !e.body.type.includes(type)) continue;
    rows.push(eventRow(e));
  }
  $("#tail tbody").replaceChildren(...rows);
  const last = $("#last-event");
  last.dataset.ts = state.lastEventTs ?? "";
}

// ---------------------------------------------------------------------------------- detail

function selectPool(pool) {
  state.selected = pool;
  state.poolEvents = [];
  $("#detail").hidden = false;
  $("#detail-pool").textContent = pool;
  $("#cmd-result").textContent = "";
  delete $("#cmd-result").dataset.outcome;
  renderDetailHeader();
  renderPoolEvents();
  if (state.selectedWatcher) state.selectedWatcher.stop();
  state.selectedWatcher = null;
  if (!state.nc) return;
  const js = jetstream(state.nc);
  let next = 0;
  state.selectedWatcher = supervised(`pool ${pool}`, async (handle) => {
    const opts = { filter_subjects: [`${state.config.prefix}.evt.${pool}.>`] };
    if (next) Object.assign(opts, { deliver_policy: "by_start_sequence", opt_start_seq: next });
    const consumer = await js.consumers.get(STREAM, opts);
    const iter = await consumer.consume();
    handle.iter = iter;
    if (handle.stopped) return iter.stop();
    for await (const m of iter) {
      next = m.seq + 1;
      if (state.selected !== pool) return iter.stop();
      try {
        state.poolEvents.push(m.json());
      } catch {
        continue;
      }
      if (state.poolEvents.length > POOL_EVENTS_MAX) state.poolEvents.splice(0, 100);
      // Whole history is read first; paint once the consumer has caught up, then per event.
      if (m.info.pending === 0) renderPoolEvents();
    }
  });
}

function renderDetailHeader() {
  const entry = state.pools.get(state.selected);
  const st = entry?.snap.state || "unready";
  const badge = $("#detail-state");
  badge.className = `state st-${st}`;
  badge.dataset.state = st;
  badge.textContent = st;
  renderPlacement(entry?.snap);
}

function renderPlacement(snap) {
  const box = $("#placement");
  const pl = snap?.placement;
  if (!pl) {
    box.textContent = "no placement";
    return;
  }
  const lines = [
    el("div", { text: `policy ${pl.policy}, CUDA_VISIBLE_DEVICES=${pl.cuda_visible_devices}` +
      (pl.tensor_split ? `, --tensor-split ${pl.tensor_split}` : "") + (pl.simulated ? " (SIMULATED)" : "") }),
    ...(pl.mask || []).map((m, i) => el("div", { text: `${m} ${pl.uuids[i] || ""}: budget ${gib((pl.budgets || [])[i] || 0)}` +
      ((pl.ratios || [])[i] != null ? `, ratio ${pl.ratios[i].toFixed(4)}` : "") })),
    ...(pl.explanation || []).map((t) => el("div", { class: "plan", text: t })),
  ];
  box.replaceChildren(...lines);
}

// The timeline is rebuilt from the pool's own events with the published lifecycle table: every
// state_changed must start where the previous one ended and be a row of the table.
function buildTimeline(events, lifecycle, rows) {
  const segments = [];
  let current = lifecycle?.initial || "unready";
  let since = null;
  for (const e of events) {
    const b = e.body;
    if (!b || b.type !== "state_changed") continue;
    if (since === null) since = e.ts;
    const legal = b.src === current && rows.has(`${b.trigger}|${b.src}|${b.dst}`);
    segments.push({ state: current, from: since, to: e.ts });
    if (!legal) segments[segments.length - 1].illegal = `${b.trigger}: ${b.src} → ${b.dst} from ${current}`;
    current = b.dst;
    since = e.ts;
  }
  if (since !== null) segments.push({ state: current, from: since, to: null });
  return segments.filter((s, i) => i === 0 || s.to === null || s.to > s.from || s.illegal);
}

function renderPoolEvents() {
  const events = state.poolEvents;
  const segments = buildTimeline(events, state.lifecycle, state.rows);
  const end = now();
  const start = segments.length ? segments[0].from : end;
  const span = Math.max(1e-3, end - start);
  const bar = el("div", { class: "bar timeline" });
  for (const s of segments) {
    const to = s.to ?? end;
    const seg = el("div", { class: `seg st-${s.state}${s.illegal ? " illegal" : ""}`, "data-state": s.state,
      title: `${s.state} ${clock(s.from)} – ${s.to ? clock(s.to) : "now"} (${(to - s.from).toFixed(2)} s)` +
        (s.illegal ? `\nnot in the lifecycle table: ${s.illegal}` : "") });
    seg.style.flexGrow = String(Math.max((to - s.from) / span, 0.004));
    bar.append(seg);
  }
  $("#timeline").replaceChildren(bar);
  const illegal = segments.filter((s) => s.illegal).length;
  $("#timeline-legend").textContent = segments.length
    ? `${segments.map((s) => s.state).join(" → ")}${illegal ? ` · ${illegal} transition(s) not in the table` : ""}`
    : "no state changes yet";
  const rows = events.slice(-300).reverse().map(eventRow);
  $("#pool-events tbody").replaceChildren(...rows);
}

// -------------------------------------------------------------------------------- commands

const VERB_TEXT = {
  preload: "Start the engine of pool",
  drain: "Drain pool (new leases are refused; the engine stops when leases reach 0 or the deadline passes)",
  reload: "Reload pool (drain, then start the new spec; rolled back if it fails)",
  stop: "Stop the engine of pool now",
  reset: "Acknowledge the crash loop of pool",
};

function askConfirm(verb, pool) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = `${VERB_TEXT[verb]} ${pool}?`;
  $("#confirm-deadline-row").hidden = !(verb === "drain" || verb === "reload");
  $("#confirm-model-row").hidden = verb !== "reload";
  $("#confirm-model").value = "";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(null);
      const fields = {};
      if (verb === "drain" || verb === "reload") {
        const d = Number($("#confirm-deadline").value);
        if (Number.isFinite(d) && d >= 0) fields.deadline_s = d;
      }
      const model = $("#confirm-model").value.trim();
      if (verb === "reload" && model) fields.model = model;
      resolve(fields);
    }, { once: true });
  });
}

function showResult(outcome, text) {
  const box = $("#cmd-result");
  box.dataset.outcome = outcome;
  box.textContent = text;
}

async function command(verb) {
  const pool = state.selected;
  if (!pool) return;
  const fields = await askConfirm(verb, pool);
  if (fields === null) return;
  if (!state.nc) return showResult("error", "not connected: nothing was sent");
  const subject = `${state.config.prefix}.cmd.${pool}.${verb}`;
  showResult("pending", `${verb} ${pool}: sent, waiting for the reply…`);
  try {
    const m = await state.nc.request(subject, encode({ command_id: commandId(), ...fields }),
      { timeout: COMMAND_TIMEOUT_MS });
    const r = m.json();
    if (r.type === "accepted") showResult("accepted", `${verb} ${pool}: accepted (event #${r.seq}, now ${r.state})`);
    else if (r.type === "rejected") showResult("rejected", `${verb} ${pool}: rejected by the daemon, ${r.code}: ${r.message}`);
    else showResult("error", `${verb} ${pool}: unexpected reply ${r.type}`);
  } catch (caught) {
    // The client wraps a request's failure (with the call site's stack); the cause says why.
    let err = caught;
    while (err?.cause instanceof Error && !(err instanceof errors.PermissionViolationError)) err = err.cause;
    if (err instanceof errors.PermissionViolationError) {
      const who = state.config.user ? `user '${state.config.user}'` : "this connection";
      showResult("refused", `${verb} ${pool}: refused by the NATS server: ${who} may not publish to ${err.subject}. ` +
        "Nothing was changed.");
    } else if (err instanceof errors.NoRespondersError) {
      showResult("error", `${verb} ${pool}: no daemon answers for this pool; nothing was changed`);
    } else if (err instanceof errors.TimeoutError) {
      showResult("error", `${verb} ${pool}: no reply within ${COMMAND_TIMEOUT_MS / 1000} s; the outcome is unknown, watch the events`);
    } else {
      showResult("error", `${verb} ${pool}: ${err.message}`);
    }
  }
}

// ------------------------------------------------------------------------------------ boot

function setText(node, text) {
  // Writing the same text still dirties layout; a thousand rows tick every second.
  if (node.textContent !== text) node.textContent = text;
}

function tickAges() {
  if (document.hidden) return;
  for (const entry of state.pools.values()) {
    if (!entry.tr.hidden && entry.values) setText(entry.cells.age, age(entry.values.age || null));
  }
  const last = $("#last-event");
  last.textContent = state.lastEventTs ? `${clock(state.lastEventTs)} (${age(state.lastEventTs)} ago)` : "none yet";
  // A node that went quiet must turn silent without needing an event.
  renderNodes();
}

// Registered before anything is awaited: a native submit would put the password in the URL.
$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (document.body.dataset.booted !== "1") return;
  connect($("#login-server").value.trim(), $("#login-user").value.trim(), $("#login-pass").value);
});

async function boot() {
  state.timings.boot = performance.now();
  try {
    const cfg = await (await fetch("config.json", { cache: "no-store" })).json();
    Object.assign(state.config, cfg);
  } catch {
    /* served without a config: the form asks */
  }
  for (const k of ["server", "prefix"]) if (params.get(k)) state.config[k] = params.get(k);
  // Another user than the served one: the form asks for that user's password.
  if (params.get("user") && params.get("user") !== state.config.user) {
    state.config.user = params.get("user");
    delete state.config.inbox_prefix;
  }
  state.lifecycle = await (await fetch("lifecycle.json")).json();
  state.rows = new Set(state.lifecycle.transitions.map((t) => `${t.trigger}|${t.source}|${t.dest}`));
  const sf = $("#state-filter");
  for (const s of state.lifecycle.states) sf.append(el("option", { value: s, text: s }));

  for (const th of document.querySelectorAll("#pools th[data-key]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      for (const h of document.querySelectorAll("#pools th")) delete h.dataset.sort;
      th.dataset.sort = state.sort.dir > 0 ? "asc" : "desc";
      state.orderDirty = true;
      scheduleRender();
    });
  }
  for (const id of ["#pool-filter", "#state-filter"]) {
    $(id).addEventListener("input", () => {
      filterDirty = true;
      scheduleRender();
    });
  }
  for (const id of ["#tail-pool", "#tail-node", "#tail-type"]) {
    $(id).addEventListener("input", () => {
      tailDirty = true;
      scheduleRender();
    });
  }
  for (const b of document.querySelectorAll(".commands button")) b.addEventListener("click", () => command(b.dataset.verb));
  $("#login-server").value = state.config.server;
  $("#login-user").value = state.config.user || "";
  $("#login-connect").disabled = false;
  setInterval(tickAges, 1000);
  document.body.dataset.booted = "1";
  // With credentials from the serving host, or without a user to log in as (an open server),
  // connect straight away; otherwise the form asks for the password.
  const cfgPass = state.config.password;
  const paramUser = params.get("user");
  delete state.config.password; // kept nowhere but in the connection
  if (state.config.server && params.get("connect") !== "0") {
    if (cfgPass && (!paramUser || paramUser === state.config.user)) {
      connect(state.config.server, state.config.user, cfgPass, state.config.inbox_prefix);
    } else if (!state.config.user) {
      connect(state.config.server, "", "");
    }
  }
}

boot();
