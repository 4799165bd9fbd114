"""Key-to-node hashing cores (sans-IO): the ring, jump, rendezvous, Maglev and bounded loads.

Pure functions and small objects with no clock and no I/O. The balancer's hashing policies
(`policies.py`) and the replicated hash table (`twlb.sim.dht`) use the same `HashRing`, and
`twlb hashing` measures all of them. Every key and node name is hashed with a named
algorithm (sha256 or md5: the first 8 bytes of the digest, big-endian), so a key lands on
the same node in every process; `SlotRing` is the baseline design's 512-slot ring
(docs/hashing.md), kept for comparison only.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

HASH_ALGORITHMS = ("sha256", "md5")
RING_SPAN = 2**64


def check_algorithm(algorithm: str) -> None:
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; choose one of {HASH_ALGORITHMS}")


def hash64(text: str, algorithm: str = "sha256") -> int:
    """A stable 64-bit hash of `text`: the first 8 bytes of its digest."""
    return int.from_bytes(hashlib.new(algorithm, text.encode()).digest()[:8], "big")


class HashRing:
    """Consistent hashing: `vnodes` points per node on a 64-bit ring; a key belongs to the
    first point clockwise from its hash.

    A node leaving moves only its own keys (to the next points' nodes); one joining takes
    about 1/N of them. `successors` gives the first n distinct nodes clockwise, the
    preference list a replicated store writes a key to.
    """

    def __init__(self, vnodes: int = 160, algorithm: str = "sha256") -> None:
        check_algorithm(algorithm)
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        self.vnodes = vnodes
        self.algorithm = algorithm
        self.nodes: list[str] = []
        self._points: list[int] = []
        self._owners: list[str] = []

    def hash(self, text: str) -> int:
        return hash64(text, self.algorithm)

    def set_nodes(self, nodes: Iterable[str]) -> None:
        self.nodes = list(dict.fromkeys(nodes))
        ring = sorted((self.hash(f"{n}#{i}"), n) for n in self.nodes for i in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [n for _, n in ring]

    def add(self, node: str) -> None:
        if node not in self.nodes:
            self.set_nodes([*self.nodes, node])

    def remove(self, node: str) -> None:
        if node in self.nodes:
            self.set_nodes([n for n in self.nodes if n != node])

    def _walk(self, key: str) -> Iterable[str]:
        owners = self._owners
        n = len(owners)
        start = bisect.bisect(self._points, self.hash(key))
        for step in range(n):
            yield owners[(start + step) % n]

    def owner(self, key: str, allowed: Iterable[str] | None = None) -> str | None:
        """The node owning `key` among `allowed` (default: every node); None if none is."""
        if not self._owners:
            return None
        if allowed is None:
            return next(iter(self._walk(key)))
        allowed = set(allowed)
        if allowed.isdisjoint(self.nodes):
            return None
        return next(n for n in self._walk(key) if n in allowed)

    def successors(self, key: str, count: int, allowed: Iterable[str] | None = None) -> list[str]:
        """The first `count` distinct nodes clockwise from `key` (fewer if there are not)."""
        allow = None if allowed is None else set(allowed)
        out: list[str] = []
        for n in self._walk(key):
            if n not in out and (allow is None or n in allow):
                out.append(n)
                if len(out) == count:
                    break
        return out

    def shares(self) -> dict[str, float]:
        """The fraction of the ring (hence of keys) each node owns."""
        out = dict.fromkeys(self.nodes, 0.0)
        if not self._points:
            return out
        prev = self._points[-1] - RING_SPAN
        for p, n in zip(self._points, self._owners, strict=True):
            out[n] += (p - prev) / RING_SPAN
            prev = p
        return out


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping and Veach 2014): the bucket in [0, buckets) of a 64-bit
    key. Growing from n to n+1 buckets moves exactly the keys that go to the new bucket."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    b, j = -1, 0
    mask = RING_SPAN - 1
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & mask
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def jump_owner(key: str, nodes: Sequence[str], algorithm: str = "sha256") -> str | None:
    """The node of `key` by jump hash over `nodes` in order (nodes join and leave at the end)."""
    if not nodes:
        return None
    return nodes[jump_hash(hash64(key, algorithm), len(nodes))]


def rendezvous_owner(key: str, nodes: Iterable[str], algorithm: str = "sha256") -> str | None:
    """Rendezvous (highest random weight) hashing: the node whose hash with the key is
    highest. A node leaving moves only its own keys; one joining takes about 1/N."""
    best: str | None = None
    best_score = -1
    for n in nodes:
        score = hash64(f"{n}|{key}", algorithm)
        if score > best_score or (score == best_score and best is not None and n < best):
            best, best_score = n, score
    return best


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def maglev_table_size(node_count: int) -> int:
    """The smallest prime above 100 x N, as the Maglev paper sizes its lookup table."""
    m = 100 * max(1, node_count) + 1
    while not is_prime(m):
        m += 1
    return m


def maglev_table(
    nodes: Sequence[str], size: int | None = None, algorithm: str = "sha256"
) -> list[str]:
    """Maglev's lookup table (Eisenbud et al. 2016): each node fills the slots of its own
    permutation (offset + j x skip mod M) in turn until every slot is taken, so each node
    holds M/N slots give or take one."""
    if not nodes:
        return []
    m = size or maglev_table_size(len(nodes))
    if not is_prime(m):
        raise ValueError(f"a Maglev table size must be prime, got {m}")
    offsets = [hash64(f"{n}#offset", algorithm) % m for n in nodes]
    skips = [hash64(f"{n}#skip", algorithm) % (m - 1) + 1 for n in nodes]
    nxt = [0] * len(nodes)
    table: list[str | None] = [None] * m
    filled = 0
    while True:
        for i, node in enumerate(nodes):
            c = (offsets[i] + nxt[i] * skips[i]) % m
            while table[c] is not None:
                nxt[i] += 1
                c = (offsets[i] + nxt[i] * skips[i]) % m
            table[c] = node
            nxt[i] += 1
            filled += 1
            if filled == m:
                return table  # type: ignore[return-value]


class MaglevTable:
    """Maglev lookup over a node set. The table size is the smallest prime above 100 x N
    for the largest N this table has served (or `size`, fixed): keeping M while nodes come
    and go is what keeps the disruption of a change near 1/N. Tables are cached by node
    set, so a balancer alternating between candidate sets (a retry leaves one backend out)
    does not rebuild them."""

    CACHE = 8

    def __init__(self, algorithm: str = "sha256", size: int | None = None) -> None:
        check_algorithm(algorithm)
        if size is not None and not is_prime(size):
            raise ValueError(f"a Maglev table size must be prime, got {size}")
        self.algorithm = algorithm
        self.fixed_size = size
        self.size = size or 0
        self._tables: dict[tuple[str, ...], list[str]] = {}
        self.table: list[str] = []

    def set_nodes(self, nodes: Iterable[str]) -> None:
        ordered = tuple(sorted(set(nodes)))  # order-free: the same set, the same table
        if self.fixed_size is None and 100 * len(ordered) >= self.size:
            self.size = maglev_table_size(len(ordered))
            self._tables.clear()
        table = self._tables.pop(ordered, None)
        if table is None:
            table = maglev_table(ordered, self.size, self.algorithm) if ordered else []
        self._tables[ordered] = table  # most recent last
        while len(self._tables) > self.CACHE:
            del self._tables[next(iter(self._tables))]
        self.table = table

    def owner(self, key: str) -> str | None:
        if not self.table:
            return None
        return self.table[hash64(key, self.algorithm) % len(self.table)]


def bounded_capacity(total_load: int, node_count: int, balance_factor: float) -> int:
    """The most load one node may carry after one more unit is placed: ceil(c (L + 1) / N)."""
    return math.ceil(balance_factor * (total_load + 1) / node_count)


def bounded_load_owner(
    ring: HashRing,
    key: str,
    loads: Mapping[str, int],
    balance_factor: float = 1.25,
    allowed: Iterable[str] | None = None,
) -> str | None:
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam 2018): the
    first node clockwise from `key` whose load is under the capacity, so after the
    placement no node carries more than c x mean + 1."""
    if balance_factor < 1.0:
        raise ValueError(f"balance factor must be at least 1, got {balance_factor}")
    allow = set(ring.nodes if allowed is None else allowed) & set(ring.nodes)
    if not allow:
        return None
    cap = bounded_capacity(sum(loads.get(n, 0) for n in allow), len(allow), balance_factor)
    for n in ring.successors(key, len(allow), allow):
        if loads.get(n, 0) < cap:
            return n
    raise AssertionError("unreachable: the capacity always leaves room on some node")


# ---- the baseline design's slot ring (docs/hashing.md), for comparison in the analyses ---


#: Slot formulas of the baseline design: request i -> i^2 + 2i + 17, virtual server (i, j)
#: -> i^2 + j^2 + 2j + 25, both mod the slot count.
def quadratic_request_slot(request: int, slots: int) -> int:
    return (request * request + 2 * request + 17) % slots


def quadratic_server_slot(server: int, replica: int, slots: int) -> int:
    return (server * server + replica * replica + 2 * replica + 25) % slots


class SlotRing:
    """The baseline design's ring: `slots` slots, `vnodes` virtual servers each placed by a
    slot function (linear probing on collision), a request going to the next server slot
    clockwise. Families: 'quadratic' (the formulas above), 'python' (Python's `hash()`,
    salted per process for strings), or a digest ('sha256', 'md5')."""

    def __init__(self, family: str, slots: int = 512, vnodes: int = 9) -> None:
        if family not in ("quadratic", "python", *HASH_ALGORITHMS):
            raise ValueError(f"unknown slot family {family!r}")
        self.family, self.slots, self.vnodes = family, slots, vnodes
        self.owner_of_slot: dict[int, int] = {}

    def _slot_fn(self) -> tuple[Callable[[int], int], Callable[[int, int], int]]:
        s = self.slots
        if self.family == "quadratic":
            return (lambda r: quadratic_request_slot(r, s)), (
                lambda i, j: quadratic_server_slot(i, j, s)
            )
        if self.family == "python":
            return (lambda r: hash(f"request-{r}") % s), (lambda i, j: hash(f"server-{i}-{j}") % s)
        a = self.family
        return (lambda r: hash64(f"request-{r}", a) % s), (
            lambda i, j: hash64(f"server-{i}-{j}", a) % s
        )

    def set_servers(self, servers: Iterable[int]) -> None:
        servers = list(servers)
        if len(servers) * self.vnodes > self.slots:
            raise ValueError(
                f"{len(servers)} x {self.vnodes} virtual servers exceed {self.slots} slots"
            )
        _, server_slot = self._slot_fn()
        self.owner_of_slot = {}
        for i in servers:
            for j in range(self.vnodes):
                slot = server_slot(i, j)
                while slot in self.owner_of_slot:  # linear probing, as the projects did
                    slot = (slot + 1) % self.slots
                self.owner_of_slot[slot] = i
        self._sorted = sorted(self.owner_of_slot)

    def owner(self, request: int) -> int:
        request_slot, _ = self._slot_fn()
        slot = request_slot(request)
        i = bisect.bisect_left(self._sorted, slot)
        return self.owner_of_slot[self._sorted[i % len(self._sorted)]]
