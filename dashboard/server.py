"""The dashboard's HTTP server: polls a cluster, feeds `ClusterView`, pushes frames by SSE.

Routes (all read-only, GET): `/` the page, `/static/<file>` its script and style (package
data, no build step), `/api/state` the whole view as JSON, `/api/events` a
server-sent-event stream (`snapshot` once, then a `frame` per polling round). The
control token, when the source has one, is used here to read each node's live fault
and never leaves this process: no route returns it and the page cannot switch faults.

Two sources: a `twlb up` state directory (the embedded runtime: processes, restarts and
tokens come from its state file) or a balancer URL (Kubernetes: the nodes are the
balancer's backends and the control token comes from the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from twlb.dashboard.view import ClusterView, NodeFacts, Observation
from twlb.processes.state import CHAOS_FILE, ClusterError, read_state_file

log = logging.getLogger("twlb.dashboard")

#: One polling round's HTTP timeout: a node that does not answer in time is "no answer".
POLL_TIMEOUT_S = 1.0
#: Bytes of the chaos log read in one round (a long log is caught up over rounds).
CHAOS_READ_BYTES = 64 * 1024
#: Page streams served at once. A page past it takes the place of the oldest stream of
#: the address that holds the most (its own oldest, if it holds as many): streams that
#: never read, from one address, cannot keep other addresses' pages out.
MAX_STREAMS = 32
#: Seconds one push to a page may wait for the page to read; a page that reads nothing
#: is dropped then.
STREAM_WRITE_TIMEOUT_S = 10.0
#: The files the page is made of, served from the package's static/ folder.
STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
#: The page loads only its own files and talks only to its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
POLLER = web.AppKey("poller", asyncio.Task)


@dataclass(eq=False, slots=True)
class _Stream:
    """One page's open event stream: who it is for, and the task serving it."""

    peer: str
    task: asyncio.Task
    request: web.Request

    def gone(self) -> bool:
        """Whether the page has closed its connection (found out before the next push)."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def end(self) -> None:
        """Drop the page's connection and stop serving it."""
        if self.request.transport is not None:
            self.request.transport.abort()
        self.task.cancel()


@dataclass(frozen=True, slots=True)
class ClusterSource:
    """Where to look: the balancer, the nodes' facts, and the token to read live faults."""

    balancer_url: str
    balancer_pid: int | None
    nodes: list[NodeFacts] | None  # None: the balancer's backends, facts unknown
    control_token: str | None
    chaos: tuple[dict[str, Any], ...] = ()  # chaos actions recorded since the last round
    #: The runtime's scaling events since the last round (None: the source keeps none).
    scaling: tuple[dict[str, Any], ...] | None = None


class StateDirSource:
    """A cluster run by `twlb up`: everything from its state file, read every round."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        read_state_file(self.state_dir)  # a clear error now rather than an empty page
        self._chaos_offset = 0
        self._scaling_seq = 0

    def _new_chaos(self) -> tuple[dict[str, Any], ...]:
        """Chaos records appended since the last round, CHAOS_READ_BYTES at most a round."""
        path = self.state_dir / CHAOS_FILE
        try:
            if path.stat().st_size < self._chaos_offset:
                self._chaos_offset = 0  # a new log (a new cluster in this directory)
            with open(path, "rb") as f:
                f.seek(self._chaos_offset)
                chunk = f.read(CHAOS_READ_BYTES)
        except FileNotFoundError:
            return ()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._chaos_offset += len(complete)
        records = (_json(line) for line in complete.splitlines())
        return tuple(r for r in records if isinstance(r, dict))

    def _new_scaling(self, state: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        """Scaling events (add, remove, fail, replace, ...) logged since the last round."""
        events = (state.get("scaling") or {}).get("events") or []
        events = [e for e in events if isinstance(e, dict) and isinstance(e.get("seq"), int)]
        if events and events[-1]["seq"] < self._scaling_seq:
            self._scaling_seq = 0  # a new runtime in this directory counts from 1 again
        new = tuple(e for e in events if e["seq"] > self._scaling_seq)
        if new:
            self._scaling_seq = new[-1]["seq"]
        return new

    def read(self) -> ClusterSource:
        state = read_state_file(self.state_dir)
        nodes = [
            NodeFacts(
                name=str(n["name"]),
                url=str(n["url"]),
                alive=bool(n.get("alive")),
                pid=n.get("pid"),
                restarts=n.get("restarts"),
                fault=(n.get("fault") or {}).get("type"),
            )
            for n in state.get("nodes", [])
        ]
        bal = state.get("balancer", {})
        return ClusterSource(
            # The admin listener serves /trust and /metrics (the traffic port proxies them).
            balancer_url=str(bal.get("admin_url") or bal.get("url")),
            balancer_pid=bal.get("pid"),
            nodes=nodes,
            control_token=state.get("tokens", {}).get("control"),
            chaos=self._new_chaos(),
            scaling=self._new_scaling(state),
        )


class BalancerSource:
    """A cluster known only through its balancer (the Kubernetes sidecar)."""

    def __init__(self, balancer_url: str, control_token: str | None = None) -> None:
        self.source = ClusterSource(balancer_url.rstrip("/"), None, None, control_token or None)

    def read(self) -> ClusterSource:
        return self.source


def parse_counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition as {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, bytes] | None:
    try:
        async with session.get(url, **kw) as r:
            return r.status, await r.content.read(1 << 20)  # bounded whatever a peer sends
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


async def collect(session: aiohttp.ClientSession, src: ClusterSource, now: float) -> Observation:
    """One polling round: the balancer's trust and metrics, each node's fault and gossip."""
    trust_r, metrics_r = await asyncio.gather(
        _get(session, src.balancer_url + "/trust"), _get(session, src.balancer_url + "/metrics")
    )
    trust = _json(trust_r[1]) if trust_r and trust_r[0] == 200 else None
    if not isinstance(trust, dict):
        trust = None
    counters: dict = {}
    if metrics_r and metrics_r[0] == 200:
        with contextlib.suppress(ValueError):
            counters = parse_counters(metrics_r[1].decode("utf-8", "replace"))
    nodes = src.nodes
    members: frozenset[str] | None = None
    if nodes is None:
        rows = trust.get("backends", []) if trust else []
        nodes = [NodeFacts(name=_host(str(r.get("url"))), url=str(r.get("url"))) for r in rows]
        if trust is not None:  # the balancer's backends are the cluster
            members = frozenset(n.url for n in nodes)
    else:  # the runtime's nodes are the cluster
        members = frozenset(n.url for n in nodes)
    headers = {"Authorization": f"Bearer {src.control_token}"} if src.control_token else None

    async def node_round(n: NodeFacts) -> tuple[NodeFacts, Any]:
        gets = [_get(session, n.url + "/gossip")]
        if headers and n.alive is not False:
            gets.append(_get(session, n.url + "/control/fault", headers=headers))
        got = await asyncio.gather(*gets)
        gossip: Any = None
        if got[0] is not None:
            gossip = "off" if got[0][0] == 404 else (_json(got[0][1]) if got[0][0] == 200 else None)
        fault = n.fault
        if len(got) > 1 and got[1] is not None and got[1][0] == 200:
            doc = _json(got[1][1])
            live = doc.get("fault", doc) if isinstance(doc, dict) else None
            if isinstance(live, dict) and isinstance(live.get("type"), str):
                fault = live["type"]
        alive = n.alive
        if alive is None and src.nodes is None:
            alive = got[0] is not None  # it answered at all
        return NodeFacts(n.name, n.url, alive, n.pid, n.restarts, fault), gossip

    rounds = await asyncio.gather(*(node_round(n) for n in nodes))
    return Observation(
        now=now,
        trust=trust,
        counters=counters,
        nodes=[facts for facts, _ in rounds],
        gossip={facts.url: g for facts, g in rounds},
        balancer_pid=src.balancer_pid,
        chaos=list(src.chaos),
        members=members,
        scaling=None if src.scaling is None else list(src.scaling),
    )


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class Dashboard:
    """The poller, the view and the web app, on one event loop."""

    def __init__(self, source: StateDirSource | BalancerSource, interval_s: float = 1.0) -> None:
        self.source = source
        self.interval_s = interval_s
        self.view = ClusterView()
        self.generation = 0
        self.last_frame: bytes = b""
        self._streams: list[_Stream] = []  # oldest first
        self._changed: asyncio.Condition | None = None
        self.static = {
            name: (files("twlb.dashboard") / "static" / name).read_bytes() for name in STATIC
        }

    # ---- polling ------------------------------------------------------------------------
    async def poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._changed is not None
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = loop.time()
                try:
                    await self.poll_once(session)
                except ClusterError as err:
                    log.warning("dashboard: %s", err)
                except Exception:  # one bad round must not stop the page
                    log.exception("dashboard polling round failed")
                await asyncio.sleep(max(0.05, self.interval_s - (loop.time() - started)))

    async def poll_once(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        src = await asyncio.to_thread(self.source.read)
        obs = await collect(session, src, time.time())
        events = self.view.observe(obs)
        for e in events:
            log.info("dashboard event %s", orjson.dumps(e).decode())
        self.last_frame = _sse("frame", self.view.frame(events))
        assert self._changed is not None
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()
        return events

    # ---- web ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()

        async def on_startup(app: web.Application) -> None:
            self._changed = asyncio.Condition()
            app[POLLER] = asyncio.create_task(self.poll_forever())

        async def on_cleanup(app: web.Application) -> None:
            app[POLLER].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await app[POLLER]

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        return app

    async def _healthz(self, _request: web.Request) -> web.Response:
        """Serving (the cluster it shows may be down: the page says so, not this probe)."""
        return web.json_response({"status": "ok", "streams": self.streams})

    @property
    def streams(self) -> int:
        return len(self._streams)

    def _make_room(self, peer: str) -> bool:
        """At the bound, end the oldest stream of the address holding the most (the new
        page's own address when it holds as many); False when there is none to end."""
        self._streams = [s for s in self._streams if not s.gone()]
        while len(self._streams) >= MAX_STREAMS:
            if not self._streams:
                return False
            counts = Counter(s.peer for s in self._streams)
            most = max(counts.values())
            holder = peer
            if counts.get(peer, 0) < most:
                holder = next(s.peer for s in self._streams if counts[s.peer] == most)
            victim = next(s for s in self._streams if s.peer == holder)
            self._streams.remove(victim)
            victim.end()
        return True

    async def _index(self, _request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC or name == "index.html":
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(
            body=self.static[name],
            content_type=STATIC[name],
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    async def _state(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(self.view.snapshot()),
            content_type="application/json",
            headers=SECURITY_HEADERS,
        )

    def _newer_than(self, generation: int) -> bool:
        return self.generation != generation

    async def _events(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or ""
        if not self._make_room(peer):
            raise web.HTTPServiceUnavailable(text=f"at most {MAX_STREAMS} pages at once")
        assert self._changed is not None
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(peer, task, request)
        self._streams.append(stream)
        resp = web.StreamResponse(headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            seen = self.generation
            first = b"retry: 2000\n\n" + _sse("snapshot", self.view.snapshot())
            await asyncio.wait_for(resp.write(first), STREAM_WRITE_TIMEOUT_S)
            while True:
                async with self._changed:
                    await self._changed.wait_for(functools.partial(self._newer_than, seen))
                missed = self.generation - seen > 1  # a slow page: start it afresh
                seen = self.generation
                chunk = _sse("snapshot", self.view.snapshot()) if missed else self.last_frame
                await asyncio.wait_for(resp.write(chunk), STREAM_WRITE_TIMEOUT_S)
        except ConnectionResetError:
            pass  # the page went away
        except TimeoutError:  # the page reads nothing
            if request.transport is not None:
                request.transport.abort()
        finally:
            if stream in self._streams:
                self._streams.remove(stream)
        return resp


class DashboardServer:
    """The dashboard on its own thread and event loop, for `twlb up` and tests."""

    def __init__(
        self,
        source: StateDirSource | BalancerSource,
        host: str = "127.0.0.1",
        port: int = 0,
        interval_s: float = 1.0,
    ) -> None:
        self.dashboard = Dashboard(source, interval_s)
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound now: a busy port fails here, clearly
        self.port = self.sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def serve(self) -> None:
        """Serve until stop() (or cancellation)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.dashboard.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.SockSite(runner, self.sock).start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> str:
        """Serve on a background thread; returns the page's URL once it listens."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve()), name="twlb-dashboard", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("the dashboard did not start listening within 10 s")
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5.0)
        self.sock.close()
