"""Replicas of one balancer share audit evidence: with their peers, and with their own
next run.

Each replica runs one `Replicas`. Every `--peer-sync` seconds, and at once when an audit
out-votes a backend or a proof changes, it POSTs its document (sharing.py: the backends
it holds suspect or proven, their offences, back-off left and the requests that exposed
them) to every peer's admin listener, `POST /admin/evidence/exchange` with the admin
token; the answer is the peer's own document, so each exchange goes both ways. Peers are
`--peer` URLs and every address of `--peer-dns` (a Kubernetes headless Service). What a
peer says is acted on as `sharing.SharedEvidence` decides: its claims are watched and
their exposing requests replayed (`Balancer.replay_audit`), never taken as proof.

With `--evidence-file`, the replica's own evidence (its book and exposures) is written
there as it changes and read back at start, its back-offs counted down by the wall-clock
time the file lay unread: a restarted replica ejects its proven liars before it serves.

At start, `warm_up` reads that file and holds one exchange round with every peer (and
the replays it calls for) before the traffic listener opens; `/readyz` answers 503
meanwhile, for at most `WARMUP_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson
from twlb.balancer.core import Balancer
from twlb.balancer.sharing import Exposure, ReplayJob, SharedEvidence
from twlb.balancer.upstream import BackendPool, UpstreamError, UpstreamLimits

from twlb.tokens import Token

log = logging.getLogger("twlb.balancer.replicas")

#: Longest wait at start for the peers' evidence and the replays it calls for.
WARMUP_S = 5.0
#: Timeout of one exchange with a peer.
EXCHANGE_TIMEOUT_S = 1.0
#: What a peer's answer may weigh.
PEER_LIMITS = UpstreamLimits(max_head_bytes=16 * 1024, max_headers=50, max_body_bytes=2 << 20)
#: Most peers whose views are kept (a spec runs at most 16 replicas); each view holds
#: claims on this replica's own backends only, from a document of at most the admin
#: listener's body limit.
MAX_PEERS = 32
#: Version of the evidence file.
FILE_FORMAT = 1
EXCHANGE_PATH = b"/admin/evidence/exchange"


class Replicas:
    """One replica's evidence sharing: its peers, its file, its replays."""

    def __init__(self, balancer: Balancer, token: Token) -> None:
        settings = balancer.settings
        self.balancer = balancer
        self.settings = settings
        self.token = token
        self.sharing = SharedEvidence(
            settings.replica_id, stale_after_s=max(3.0, 6.0 * settings.peer_sync_s)
        )
        self.file: Path | None = settings.evidence_file
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._replays: set[asyncio.Task] = set()
        self._pools: dict[str, BackendPool] = {}
        self._self: set[str] = set()  # peer addresses found to be this replica
        self._written: Any = None  # what the file holds (standings, not times)
        self.exchanges = {"ok": 0, "failed": 0, "refused": 0}
        self.replayed = 0
        balancer.audit_listeners.append(self._on_verdict)

    # -- what this replica finds ---------------------------------------------------------

    def _on_verdict(self, verdict: Any, method: str, target: bytes, headers: list) -> None:
        if verdict.quorum_met and verdict.odd:
            exposure = Exposure.of(method, target, headers)
            for backend in verdict.odd:
                self.sharing.note_exposure(backend, exposure)
            self.poke()

    def poke(self) -> None:
        """Exchange with the peers now (a backend was out-voted, a proof changed)."""
        if self._wake is not None:
            self._wake.set()

    def document(self) -> dict[str, Any]:
        return self.sharing.document(self.balancer.engine.evidence, self.balancer.clock())

    # -- lifecycle -----------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Read the evidence file, then one exchange round with every peer and the
        replays it calls for, within WARMUP_S; not ready meanwhile."""
        b = self.balancer
        b.warming = True
        try:
            self.load()
            self._wake = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WARMUP_S):
                    await self._round()
                    while self._replays:
                        await asyncio.wait(set(self._replays))
        finally:
            b.warming = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="twlb-replicas")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._replays) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self.save()

    async def _loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.peer_sync_s):
                    await wake.wait()
            wake.clear()
            try:
                await self._round()
            except Exception:  # a bug here must not stop the sharing for good
                log.exception("evidence exchange round failed")

    # -- peers ---------------------------------------------------------------------------

    async def peer_urls(self) -> list[str]:
        """The peers' admin URLs now: the `--peer`s and every address of `--peer-dns`."""
        urls = list(self.settings.peers)
        if self.settings.peer_dns:
            host, _, port = self.settings.peer_dns.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, int(port), type=socket.SOCK_STREAM
                )
            except OSError as err:
                log.warning("peers: cannot resolve %s: %s", host, err)
                infos = []
            for family, *_, address in infos:
                ip = address[0]
                urls.append(
                    f"http://[{ip}]:{port}" if family == socket.AF_INET6 else f"http://{ip}:{port}"
                )
        seen: list[str] = []
        for url in urls:
            if url not in seen and url not in self._self:
                seen.append(url)
        return seen

    async def _round(self) -> None:
        """Exchange with every peer, then act on what they said."""
        peers = await self.peer_urls()
        if peers:
            body = orjson.dumps(self.document())
            await asyncio.gather(*(self._exchange(url, body) for url in peers))
        self._act()

    async def _exchange(self, url: str, body: bytes) -> None:
        pool = self._pools.get(url)
        if pool is None:
            pool = self._pools[url] = BackendPool(url, PEER_LIMITS, max_idle=2)
        token = self.token.value or ""
        headers = [
            (b"authorization", b"Bearer " + token.encode("latin-1")),
            (b"content-type", b"application/json"),
        ]
        try:
            r = await pool.request("POST", EXCHANGE_PATH, headers, body, EXCHANGE_TIMEOUT_S)
        except UpstreamError as err:
            self.exchanges["failed"] += 1
            log.debug("peer %s: no exchange: %s", url, err)
            return
        if r.status != 200:
            self.exchanges["refused"] += 1
            log.warning("peer %s refused the evidence exchange: %d %s", url, r.status, r.body[:200])
            return
        try:
            doc = orjson.loads(r.body)
            replica = doc.get("replica") if isinstance(doc, dict) else None
            if replica == self.settings.replica_id:
                self._self.add(url)  # this replica's own address (a DNS name covers all)
                return
            self._receive(doc)
        except (orjson.JSONDecodeError, ValueError) as err:
            self.exchanges["refused"] += 1
            log.warning("peer %s sent evidence that is not usable: %s", url, err)
            return
        self.exchanges["ok"] += 1

    def _receive(self, doc: Any) -> str:
        b = self.balancer
        rule = b.engine.evidence.rule
        replica = self.sharing.parse_name(doc)
        if replica not in self.sharing.views and len(self.sharing.views) >= MAX_PEERS:
            oldest = min(self.sharing.views.values(), key=lambda v: v.received_at)
            self.sharing.drop_peer(oldest.replica)
        return self.sharing.receive(
            replica, doc, b.clock(), rule.max_backoff_s, fleet=b.fleet.records
        )

    def answer(self, doc: Any) -> dict[str, Any]:
        """A peer's exchange (the API's POST): take its document (ValueError when it is
        not one), act on it, and answer with this replica's."""
        # This replica's own document (its --peer-dns name covers its own address too) is
        # answered, not taken: the caller learns that address is its own.
        if self._receive(doc) != self.settings.replica_id:
            self._act()
        return self.document()

    # -- acting on what peers say ----------------------------------------------------------

    def _act(self) -> None:
        b = self.balancer
        now = b.clock()
        book = b.engine.evidence
        fleet = b.fleet.records
        self.sharing.forget(fleet)
        watched = self.sharing.watched(fleet, now)
        audit_watch = b.auditor.watched
        if watched != audit_watch:
            audit_watch.clear()
            audit_watch.update(watched)  # in place: the auditor reads this set
        if self.sharing.adopt_backoff(book, now):
            self.poke()
        for job in self.sharing.replays_due(book, fleet, now):
            task = asyncio.get_running_loop().create_task(self._replay(job), name="twlb-replay")
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)
        self._write_if_changed()

    async def _replay(self, job: ReplayJob) -> None:
        """Ask the accused the exposing requests (with two voters each, as an audit) until
        this replica's own evidence proves it, or each was asked once (a suspicion)."""
        b = self.balancer
        book = b.engine.evidence
        try:
            for i in range(job.tries):
                if book.is_proven(job.backend) or job.backend not in b.fleet.records:
                    break
                method, target, headers = job.exposures[i % len(job.exposures)].request()
                verdict = await b.replay_audit(job.backend, method, target, headers)
                self.replayed += 1
                if verdict is None:
                    break
        finally:
            self.sharing.replay_done(job.backend)
        if book.is_proven(job.backend):
            log.warning(
                "replicas: backend %s proven here on replayed requests", job.backend,
                extra={"backend": job.backend, "replays": self.replayed},
            )  # fmt: skip
            self.sharing.adopt_backoff(book, b.clock())
            self.poke()

    # -- the evidence file ---------------------------------------------------------------

    def _file_content(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "replica": self.settings.replica_id,
            "written_at": time.time(),  # wall clock: the next run counts the time it lay
            "evidence": self.balancer.export_evidence(self.balancer.clock()),
            "exposures": {u: [x.as_json() for x in xs] for u, xs in self.sharing.exposures.items()},
        }

    def _standings(self) -> Any:
        doc = self.document()["backends"]
        return {u: (c["standing"], c["offences"], len(c["exposures"])) for u, c in doc.items()}

    def _write_if_changed(self) -> None:
        if self.file is not None and self._standings() != self._written:
            self.save()

    def save(self) -> None:
        """Write this replica's own evidence to its file (atomically), if it has one."""
        if self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(self.file.name + ".tmp")
            tmp.write_bytes(orjson.dumps(self._file_content()))
            os.replace(tmp, self.file)
            self._written = self._standings()
        except OSError as err:
            log.warning("cannot write the evidence file %s: %s", self.file, err)

    def load(self) -> list[str]:
        """Put the evidence file's evidence in force (its own, from this replica's last
        run), back-offs counted down by the time since it was written; returns the
        backends it named. A missing file is a first start; an unusable one is logged and
        left alone (it is rewritten once evidence changes)."""
        if self.file is None:
            return []
        try:
            doc = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            log.warning("evidence file %s not read: %s", self.file, err)
            return []
        try:
            if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
                raise ValueError(f"format must be {FILE_FORMAT}")
            lay = max(0.0, time.time() - float(doc["written_at"]))
            evidence = doc["evidence"]
            for e in evidence.get("backends", {}).values():
                if isinstance(e, dict):
                    if isinstance(e.get("backoff_left_s"), int | float):
                        e["backoff_left_s"] = max(0.0, e["backoff_left_s"] - lay)
                    if isinstance(e.get("proven_s_ago"), int | float):
                        e["proven_s_ago"] += lay
            taken = self.balancer.import_evidence(evidence, self.balancer.clock())
            for url, xs in (doc.get("exposures") or {}).items():
                for x in xs if isinstance(xs, list) else ():
                    with contextlib.suppress(ValueError):
                        self.sharing.note_exposure(url, Exposure.parse(x))
        except (KeyError, TypeError, ValueError) as err:
            log.warning("evidence file %s not used: %s", self.file, err)
            return []
        proven = [u for u in taken if self.balancer.engine.evidence.is_proven(u)]
        log.info(
            "evidence file %s read: %d backends, %d proven liars kept out", self.file,
            len(taken), len(proven), extra={"proven": proven},
        )  # fmt: skip
        self._written = self._standings()
        return taken
