"""What replicas of one balancer tell each other about liars, and what a replica does
with what it is told (sans-IO: fed documents and `now`, reads no clock).

A replica never takes a peer's word for a proof. What it takes from a peer is *where to
look*: the backends the peer holds suspect or proven, and the requests that exposed
each (`Exposure`: the method, target and headers of an audited request the backend was
out-voted on). The receiver then

- audits those backends' answers at its suspect fraction while a peer's claim stands
  (`watched`: so the second lie is caught by whichever replica serves it), and
- replays the exposing requests itself at once (`replays_due`): it asks the accused
  and its own voters, judges the answers as any audit, and records the verdicts in its
  own evidence book, under its own rule. Only its own evidence ejects a backend here.

So a faulty or lying replica can make the others audit more (bounded: a watch covers at
most a quarter of the fleet, `WATCH_SHARE`; a replay run asks at most `REPLAY_TRIES`
times, one run per backend at a time, again for the same claim only after
`REPLAY_AGAIN_S`), but it cannot get an honest backend ejected anywhere: an honest
backend's answer to a replayed request agrees with the voters', which records nothing
against it (agreement banks no credit and charges nothing).

Once a replica has proven a backend with its own evidence, it keeps it out as long as
the longest back-off a peer claims for it (capped at the rule's longest): how long a
proven liar stays out is the fleet's, so a replica restarted into it, which proves the
liar afresh, does not readmit it early (`adopt_backoff`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twlb.balancer.evidence import EvidenceBook, Standing

#: Version of the exchanged document.
SHARING_FORMAT = 1
#: Exposing requests kept per backend (the most recent).
MAX_EXPOSURES = 4
#: Largest request target kept and accepted, bytes.
MAX_TARGET = 8192
#: Most header lines, and their bytes, kept and accepted with one exposure.
MAX_HEADERS = 32
MAX_HEADER_BYTES = 8192
#: Headers never kept nor shared: a client's credentials stay in the replica it reached.
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})
#: Asks of the accused in one replay run for a claimed proof (its lies may be rare).
REPLAY_TRIES = 16
#: A claim replayed once is replayed again only this much later (unless new exposures).
REPLAY_AGAIN_S = 30.0
#: Most of the fleet a peer's claims can have watched (audited at the suspect fraction).
WATCH_SHARE = 0.25
#: Most backends one exchanged document may name.
MAX_CLAIMS = 10_000


@dataclass(frozen=True)
class Exposure:
    """An audited request a backend was out-voted on: what a peer replays."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> Exposure:
        """The exposure of an audited request, without private headers, within the caps."""
        kept: list[tuple[str, str]] = []
        size = 0
        for name, value in headers:
            n = name.decode("latin-1").lower()
            if n in PRIVATE_HEADERS:
                continue
            v = value.decode("latin-1")
            size += len(n) + len(v)
            if len(kept) >= MAX_HEADERS or size > MAX_HEADER_BYTES:
                break
            kept.append((n, v))
        return cls(method, target[:MAX_TARGET].decode("latin-1"), tuple(kept))

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "headers": [list(h) for h in self.headers],
        }

    @classmethod
    def parse(cls, doc: Any) -> Exposure:
        """An exposure from a peer's document; ValueError naming what is wrong."""
        if not isinstance(doc, Mapping):
            raise ValueError("an exposure is an object")
        method, target, headers = doc.get("method"), doc.get("target"), doc.get("headers", [])
        if method != "GET":
            raise ValueError(
                f"exposure method must be GET (audits ask nothing else), not {method!r}"
            )
        if not isinstance(target, str) or not target.startswith("/") or len(target) > MAX_TARGET:
            raise ValueError(f"exposure target must be a path of at most {MAX_TARGET} characters")
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in target):
            raise ValueError("exposure target has a character not allowed in a request target")
        if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
            raise ValueError(f"exposure headers must be a list of at most {MAX_HEADERS} pairs")
        kept: list[tuple[str, str]] = []
        size = 0
        for pair in headers:
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            ):
                raise ValueError("an exposure header is a [name, value] pair of strings")
            name, value = pair[0].lower(), pair[1]
            if not name or any(not (0x21 <= ord(c) <= 0x7E) or c == ":" for c in name):
                raise ValueError(f"exposure header name {name!r} is not a token")
            if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
                raise ValueError(f"exposure header {name} has a control character")
            size += len(name) + len(value)
            if name not in PRIVATE_HEADERS:
                kept.append((name, value))
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"exposure headers over {MAX_HEADER_BYTES} bytes")
        return cls(method, target, tuple(kept))

    def request(self) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
        """Method, target and headers to send it again."""
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.headers]
        return self.method, self.target.encode("latin-1"), headers


@dataclass
class Claim:
    """What a peer says of one backend: its standing there and how it was exposed."""

    standing: Standing
    offences: int = 0
    backoff_left_s: float | None = None
    exposures: tuple[Exposure, ...] = ()


@dataclass
class PeerView:
    """A peer's last document: its name, claims, and when it came."""

    replica: str
    claims: dict[str, Claim]
    received_at: float


@dataclass(frozen=True)
class ReplayJob:
    """A replay run to do: ask `backend` the exposing requests, at most `tries` asks,
    until this replica's evidence proves it (`prove`) or each has been asked once."""

    backend: str
    exposures: tuple[Exposure, ...]
    tries: int
    prove: bool


def parse_document(doc: Any, max_backoff_s: float) -> tuple[str, dict[str, Claim]]:
    """A peer's document as (its replica name, its claims); ValueError naming what is
    wrong, before anything is taken from it."""
    if not isinstance(doc, Mapping):
        raise ValueError("an evidence exchange is a JSON object")
    if doc.get("format") != SHARING_FORMAT:
        raise ValueError(f"exchange format must be {SHARING_FORMAT}, not {doc.get('format')!r}")
    replica = doc.get("replica")
    if not isinstance(replica, str) or not 0 < len(replica) <= 253:
        raise ValueError("exchange 'replica' must be a name of 1..253 characters")
    backends = doc.get("backends")
    if not isinstance(backends, Mapping) or len(backends) > MAX_CLAIMS:
        raise ValueError(f"exchange 'backends' must be an object of at most {MAX_CLAIMS} backends")
    claims: dict[str, Claim] = {}
    for url, data in backends.items():
        where = f"backend {str(url)[:200]!r}"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a claim is an object")
        try:
            standing = Standing(data.get("standing"))
        except ValueError:
            raise ValueError(f"{where}: standing must be suspect or proven") from None
        if standing is Standing.CLEAR:
            raise ValueError(f"{where}: only suspect or proven backends are claimed")
        offences = data.get("offences", 0)
        if isinstance(offences, bool) or not isinstance(offences, int) or not 0 <= offences <= 64:
            raise ValueError(f"{where}: offences must be an integer 0..64")
        left = data.get("backoff_left_s")
        if left is not None:
            if isinstance(left, bool) or not isinstance(left, int | float) or not 0 <= left < 1e9:
                raise ValueError(f"{where}: backoff_left_s must be a number >= 0")
            left = min(float(left), max_backoff_s)
        exposures = data.get("exposures", [])
        if not isinstance(exposures, list) or len(exposures) > MAX_EXPOSURES:
            raise ValueError(f"{where}: at most {MAX_EXPOSURES} exposures")
        try:
            parsed = tuple(Exposure.parse(e) for e in exposures)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        claims[str(url)] = Claim(standing, offences, left, parsed)
    return replica, claims


@dataclass
class SharedEvidence:
    """One replica's side of the sharing: its own exposures, its peers' views, the
    replays and watches they call for."""

    replica: str
    #: A peer's view counts for this long after it came (then its claims lapse).
    stale_after_s: float = 3.0
    exposures: dict[str, deque[Exposure]] = field(default_factory=dict)
    views: dict[str, PeerView] = field(default_factory=dict)
    _replaying: set[str] = field(default_factory=set)
    _replayed: dict[tuple[str, Exposure], float] = field(default_factory=dict)
    _proof_replayed: dict[str, float] = field(default_factory=dict)

    # -- this replica's own evidence -----------------------------------------------------

    def note_exposure(self, backend: str, exposure: Exposure) -> None:
        """`backend` was out-voted on this audited request."""
        kept = self.exposures.get(backend)
        if kept is None:
            kept = self.exposures[backend] = deque(maxlen=MAX_EXPOSURES)
        if exposure not in kept:
            kept.append(exposure)

    def forget(self, fleet: Collection[str]) -> None:
        """Drop what concerns backends no longer in the fleet."""
        for url in [u for u in self.exposures if u not in fleet]:
            del self.exposures[url]

    def document(self, book: EvidenceBook, now: float) -> dict[str, Any]:
        """What this replica tells its peers: its suspect and proven backends, with their
        offences, back-off left and exposing requests."""
        backends: dict[str, Any] = {}
        for url in book.suspects | set(book.proven()):
            e = book[url]
            backends[url] = {
                "standing": e.standing.value,
                "offences": e.offences,
                "backoff_left_s": None if e.out_until is None else max(0.0, e.out_until - now),
                "exposures": [x.as_json() for x in self.exposures.get(url, ())],
            }
        return {"format": SHARING_FORMAT, "replica": self.replica, "backends": backends}

    # -- what peers say -----------------------------------------------------------------

    @staticmethod
    def parse_name(doc: Any) -> str:
        """The replica name a document gives (ValueError when it gives none)."""
        replica = doc.get("replica") if isinstance(doc, Mapping) else None
        if not isinstance(replica, str) or not 0 < len(replica) <= 253:
            raise ValueError("exchange 'replica' must be a name of 1..253 characters")
        return replica

    def receive(
        self,
        peer: str,
        doc: Any,
        now: float,
        max_backoff_s: float,
        fleet: Collection[str] | None = None,
    ) -> str:
        """Take a peer's document, its view kept under `peer` (its replica name), its
        claims on backends of `fleet` only (when given); ValueError, nothing taken, when
        it is not one. Returns the peer's replica name."""
        replica, claims = parse_document(doc, max_backoff_s)
        if fleet is not None:
            claims = {url: c for url, c in claims.items() if url in fleet}
        if replica != self.replica:
            self.views[peer] = PeerView(replica, claims, now)
        return replica

    def drop_peer(self, peer: str) -> None:
        self.views.pop(peer, None)

    def _fresh(self, now: float) -> list[PeerView]:
        return [v for v in self.views.values() if now - v.received_at <= self.stale_after_s]

    def watched(self, fleet: Collection[str], now: float) -> set[str]:
        """Backends of the fleet some fresh peer claims suspect or proven: audited here at
        the suspect fraction. At most WATCH_SHARE of the fleet (at least 2), the most
        claimed first."""
        counts: dict[str, int] = {}
        for view in self._fresh(now):
            for url in view.claims:
                if url in fleet:
                    counts[url] = counts.get(url, 0) + 1
        room = max(2, int(WATCH_SHARE * len(fleet)))
        ranked = sorted(counts, key=lambda u: (-counts[u], u))
        return set(ranked[:room])

    def replays_due(
        self, book: EvidenceBook, fleet: Collection[str], now: float
    ) -> list[ReplayJob]:
        """The replay runs peers' claims call for now (each marked running: call
        `replay_done` when it ends)."""
        jobs: list[ReplayJob] = []
        claimed: dict[str, list[Claim]] = {}
        for view in self._fresh(now):
            for url, claim in view.claims.items():
                if url in fleet:
                    claimed.setdefault(url, []).append(claim)
        for url, claims in claimed.items():
            if url in self._replaying or book.is_proven(url):
                continue
            exposures: list[Exposure] = []
            for claim in claims:
                for x in claim.exposures:
                    if x not in exposures:
                        exposures.append(x)
            if not exposures:
                continue
            proven = any(c.standing is Standing.PROVEN for c in claims)
            fresh = [
                x for x in exposures
                if now - self._replayed.get((url, x), -float("inf")) >= REPLAY_AGAIN_S
            ]  # fmt: skip
            prove = proven and now - self._proof_replayed.get(url, -float("inf")) >= REPLAY_AGAIN_S
            if not fresh and not prove:
                continue
            order = tuple(fresh + [x for x in exposures if x not in fresh])
            tries = REPLAY_TRIES if prove else len(fresh)
            jobs.append(ReplayJob(url, order, tries, prove))
            self._replaying.add(url)
            for x in order[:tries]:
                self._replayed[(url, x)] = now
            if prove:
                self._proof_replayed[url] = now
        return jobs

    def replay_done(self, backend: str) -> None:
        self._replaying.discard(backend)

    def adopt_backoff(self, book: EvidenceBook, now: float) -> list[str]:
        """Extend the back-off of each backend proven here to the longest a fresh peer
        claims for it (and its offences to the most claimed); returns those extended."""
        extended = []
        for view in self._fresh(now):
            for url, claim in view.claims.items():
                if claim.standing is not Standing.PROVEN or claim.backoff_left_s is None:
                    continue
                if (
                    url in book
                    and book.is_proven(url)
                    and book.extend(url, now + claim.backoff_left_s, claim.offences)
                ):
                    extended.append(url)
        return extended
