"""A fake inference engine that speaks llama.cpp ``llama-server``'s health protocol.

Run it as ``python -m pool_managerd.testing.fake_engine --port N [knobs] [llama-server args]``.

While "loading" every endpoint answers 503 ``{"error":{"code":503,"message":"Loading model"}}``
(as llama-server does); afterwards ``GET /health`` answers 200 ``{"status":"ok"}``, ``GET /slots``
a list of ``--slots`` slot objects, ``GET /v1/models`` the model list and ``GET /props`` the server
properties plus what the fake saw (``cuda_visible_devices``, ``argv``, ``extra_args``, ``pid``), so a
test can check what the daemon passed.

Unknown arguments are accepted and ignored, so a llama-server argv template can point at this
module unchanged. Only exact tokens are recognised (no prefix matching): llama-server has many
short flags (``-mg``, ``-ctk``...) that a prefix-matching parser would misread.

Timing knobs count from the moment ``main`` starts (after interpreter start-up), or from the
moment the engine became healthy for the ``*-ready`` variants. The flip to healthy is scheduled
with ``loop.call_later``, so it happens at the load time, not at the next poll. ``SIGUSR1`` ends
loading at once (with ``--load-time inf`` this makes the flip fully test-controlled).

See ``README.md`` next to this file for every knob.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

# llama-server's single-dash spellings of options we care about; translated only when the whole
# token matches, so that e.g. ``-mg`` (main GPU) is never read as ``-m g``.
_SHORT_ALIASES = {"-m": "--model", "-a": "--alias", "-np": "--parallel", "-c": "--ctx-size"}

_LOADING_BODY = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
_NOT_FOUND_BODY = {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
_MAX_REQUEST_HEAD = 16 * 1024

GPU_ALLOC_MODES = ("budget", "none", "wrong-device", "first-only", "under")
# The simulated driver's interface (pool_managerd.adapters.sim_gpus), spelled out here so the
# fake engine starts without importing the package's wire types.
_SIM_GPU_DIR_ENV = "POOL_MANAGERD_SIM_GPU_DIR"
_SIM_GPU_BUDGETS_ENV = "POOL_MANAGERD_SIM_GPU_BUDGETS"
_DEFAULT_ALLOC = 512 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    """The fake engine's argument parser (long options only; see ``_SHORT_ALIASES``)."""
    p = argparse.ArgumentParser(
        prog="python -m pool_managerd.testing.fake_engine",
        description="Fake llama.cpp-like engine for tests and demos.",
        allow_abbrev=False,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on stderr)")
    p.add_argument("--model", default="fake-model.gguf")
    p.add_argument("--alias", default=None, help="model id reported by /v1/models (default: --model)")
    p.add_argument("--slots", type=int, default=None, help="number of slots (alias: --parallel/-np)")
    p.add_argument("--parallel", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--load-time", type=float, default=0.0, help="seconds until healthy; inf = never")
    p.add_argument("--crash-after", type=float, default=None, help="exit after S s from start")
    p.add_argument("--crash-after-ready", type=float, default=None, help="exit S s after healthy")
    p.add_argument("--exit-code", type=int, default=1, help="exit code of --crash-after*")
    p.add_argument("--hang-after", type=float, default=None, help="stop answering after S s")
    p.add_argument("--hang-after-ready", type=float, default=None, help="stop answering S s after ok")
    p.add_argument("--fail-bind", action="store_true", help="exit 98 at once, like a bind failure")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--exit-on-sigterm-code", type=int, default=0)
    p.add_argument("--spawn-grandchild", action="store_true", help="start a long-lived grandchild")
    p.add_argument("--grandchild-pid-file", default=None)
    p.add_argument("--ready-file", default=None, help="write time.time() of the healthy instant")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--gpu-alloc", choices=GPU_ALLOC_MODES, default="budget",
                   help="on a simulated inventory, what to allocate: the plan's budget on every GPU of the "
                        "mask, nothing (a CPU fallback), on a GPU outside the mask, on the first GPU only, "
                        "or a tenth of the budget")  # fmt: skip
    p.add_argument("--gpu-alloc-after", type=float, default=0.0, help="allocate S s after start (late allocation)")
    p.add_argument("--gpu-alloc-bytes", type=int, default=None, help="bytes per GPU instead of the plan's budget")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse our knobs, returning them and the ignored (llama-server) arguments."""
    normalised = [_SHORT_ALIASES.get(a, a) for a in argv]
    args, extra = build_parser().parse_known_args(normalised)
    if args.slots is None:
        args.slots = args.parallel if args.parallel is not None else 1
    if args.slots < 1:
        raise SystemExit("fake_engine: --slots must be >= 1")
    return args, extra


def _log(msg: str) -> None:
    print(f"fake_engine[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _hard_exit(code: int) -> None:
    # os._exit: no cleanup that could block (a hanging handler, the grandchild), like a real crash.
    sys.stderr.flush()
    os._exit(code)


class FakeEngine:
    """The server state; every transition is scheduled on the loop, never polled."""

    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args = args
        self.extra = extra
        self.loading = True
        self.hanging = False
        self.ready_at: float | None = None
        self.model_id: str = args.alias or args.model
        self.stopped: asyncio.Future[int] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def become_ready(self) -> None:
        if not self.loading:
            return
        self.loading = False
        self.ready_at = time.time()
        if self.args.ready_file:
            _write_atomic(self.args.ready_file, repr(self.ready_at))
        _log("model loaded; srv update_slots: all slots are idle")
        loop = asyncio.get_running_loop()
        if self.args.crash_after_ready is not None:
            loop.call_later(self.args.crash_after_ready, self.crash)
        if self.args.hang_after_ready is not None:
            loop.call_later(self.args.hang_after_ready, self.hang)

    def crash(self) -> None:
        _log(f"crashing with exit code {self.args.exit_code}")
        _hard_exit(self.args.exit_code)

    def hang(self) -> None:
        _log("hanging: connections are accepted but never answered")
        self.hanging = True

    def on_sigterm(self, signame: str) -> None:
        if self.args.ignore_sigterm:
            _log(f"ignoring {signame}")
            return
        _log(f"received {signame}; exiting with code {self.args.exit_on_sigterm_code}")
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(self.args.exit_on_sigterm_code)

    # -- HTTP --------------------------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, {"error": {"code": 405, "message": "Method Not Allowed"}}
        if path not in ("/health", "/slots", "/v1/models", "/models", "/props"):
            return 404, _NOT_FOUND_BODY
        if self.loading:
            return 503, _LOADING_BODY
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/slots":
            return 200, [self._slot(i) for i in range(self.args.slots)]
        if path in ("/v1/models", "/models"):
            return 200, {
                "object": "list",
                "data": [
                    {
                        "id": self.model_id,
                        "object": "model",
                        "created": int(self.ready_at or 0),
                        "owned_by": "llamacpp",
                        "meta": {"fake": True, "model_path": self.args.model},
                    }
                ],
            }
        return 200, {
            "default_generation_settings": {"n_ctx": self.args.ctx_size},
            "total_slots": self.args.slots,
            "model_path": self.args.model,
            "fake": True,
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "argv": sys.argv[1:],
            "extra_args": self.extra,
            "ready_at": self.ready_at,
        }

    def _slot(self, i: int) -> dict[str, Any]:
        return {
            "id": i,
            "id_task": -1,
            "n_ctx": self.args.ctx_size,
            "speculative": False,
            "is_processing": False,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # HTTP/1.1 keep-alive like llama-server: requests are answered on the same connection
        # until the client says "Connection: close" or goes away.
        try:
            while await self._answer(reader, writer):
                pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return False
        if self.hanging:
            # A wedged engine: the kernel accepted the connection, the application never answers.
            await asyncio.get_running_loop().create_future()
        lines = head.split(b"\r\n")
        keep = not any(line.lower().startswith(b"connection:") and b"close" in line.lower() for line in lines[1:])
        try:
            method, target, _version = lines[0].decode("latin-1").split(" ", 2)
        except ValueError:
            status, body = 400, {"error": {"code": 400, "message": "Bad Request"}}
            method, keep = "GET", False
        else:
            status, body = self.route(method, target)
        payload = json.dumps(body, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode(
                "latin-1"
            )
            + (b"" if method == "HEAD" else payload)
        )
        try:
            await writer.drain()
        except ConnectionError:
            return False
        return keep


def gpu_allocation(
    mode: str, visible: list[str], budgets: dict[str, int], all_uuids: list[str], per_gpu: int | None
) -> dict[str, int]:
    """What the fake engine "allocates" per GPU UUID in ``mode`` (see ``--gpu-alloc``)."""

    def size(uuid: str) -> int:
        return per_gpu if per_gpu is not None else (budgets.get(uuid) or _DEFAULT_ALLOC)

    if mode == "none" or not visible:
        return {}
    if mode == "wrong-device":
        others = [u for u in all_uuids if u not in visible]
        return {others[0]: sum(size(u) for u in visible)} if others else {}
    if mode == "first-only":
        return {visible[0]: size(visible[0])}
    if mode == "under":
        return {u: max(1, size(u) // 10) for u in visible}
    return {u: size(u) for u in visible}


def _record_gpu_alloc(args: argparse.Namespace) -> None:
    """Record this process's simulated allocations where the simulated driver reads them."""
    root = os.environ.get(_SIM_GPU_DIR_ENV)
    if not root:
        return
    visible = [u for u in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if u]
    try:
        budgets = {str(k): int(v) for k, v in json.loads(os.environ.get(_SIM_GPU_BUDGETS_ENV) or "{}").items()}
    except (ValueError, AttributeError):
        budgets = {}
    try:
        with open(os.path.join(root, "gpus.json"), encoding="utf-8") as f:
            all_uuids = [str(u) for u in json.load(f).get("uuids", [])]
    except (OSError, ValueError, AttributeError):
        all_uuids = []
    alloc = gpu_allocation(args.gpu_alloc, visible, budgets, all_uuids, args.gpu_alloc_bytes)
    os.makedirs(os.path.join(root, "procs"), exist_ok=True)
    _write_atomic(os.path.join(root, "procs", f"{os.getpid()}.json"), json.dumps({"pid": os.getpid(), "alloc": alloc}))
    _log(f"gpu alloc ({args.gpu_alloc}): {alloc}")


def _spawn_grandchild(args: argparse.Namespace) -> None:
    # Same process group as us (no new session): only a group kill can reach it once we die.
    sleep = shutil.which("sleep")
    cmd = [sleep, "3600"] if sleep else [sys.executable, "-c", "import time; time.sleep(3600)"]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    _log(f"spawned grandchild pid={child.pid}")
    if args.grandchild_pid_file:
        _write_atomic(args.grandchild_pid_file, str(child.pid))


async def serve(args: argparse.Namespace, extra: list[str], t0: float) -> int:
    """Run the fake engine until SIGTERM/SIGINT (or a crash knob); return the exit code."""
    loop = asyncio.get_running_loop()
    engine = FakeEngine(args, extra)
    engine.stopped = loop.create_future()
    # Handlers go in before the port is bound: once a client can connect, a signal is handled
    # the way the knobs say (a test that waits for the port can rely on --ignore-sigterm).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, engine.on_sigterm, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, engine.become_ready)
    if args.spawn_grandchild:
        _spawn_grandchild(args)

    if args.fail_bind:
        _log(f"couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port} (--fail-bind)")
        return errno.EADDRINUSE
    try:
        server = await asyncio.start_server(engine.handle, args.host, args.port, limit=_MAX_REQUEST_HEAD, backlog=512)
    except OSError as exc:
        _log(f"couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port}: {exc}")
        return errno.EADDRINUSE if exc.errno == errno.EADDRINUSE else 1
    port = server.sockets[0].getsockname()[1]
    if args.pid_file:
        _write_atomic(args.pid_file, str(os.getpid()))
    _log(
        f"server is listening on http://{args.host}:{port} model={args.model} slots={args.slots} "
        f"load_time={args.load_time} cuda_visible_devices={os.environ.get('CUDA_VISIBLE_DEVICES')}"
    )

    def after(seconds: float | None, fn: Any) -> None:
        # Deadlines are relative to t0 (main start), not to "now", so bind time is not added.
        if seconds is not None and math.isfinite(seconds):
            loop.call_later(max(0.0, seconds - (time.monotonic() - t0)), fn)

    if args.gpu_alloc_after > 0:
        after(args.gpu_alloc_after, lambda: _record_gpu_alloc(args))
    else:
        _record_gpu_alloc(args)
    after(args.load_time, engine.become_ready)
    after(args.crash_after, engine.crash)
    after(args.hang_after, engine.hang)
    code = await engine.stopped
    server.close()
    # Exit here, not through asyncio.run's teardown: hung handlers would only add noise.
    _hard_exit(code)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m pool_managerd.testing.fake_engine``."""
    t0 = time.monotonic()
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    _log(f"starting pid={os.getpid()} pgid={os.getpgrp()} ignored_args={extra}")
    code = asyncio.run(serve(args, extra, t0))
    _hard_exit(code)


if __name__ == "__main__":
    main()
