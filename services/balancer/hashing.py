"""Key-to-node hashing cores (sans-IO): the ring, jump, rendezvous, Maglev and bounded loads.

Pure functions and small objects with no clock and no I/O. The balancer's hashing policies
(`policies.py`) and the replicated hash table (`twlb.sim.dht`) use the same `HashRing`, and
`twlb hashing` measures all of them. Every structure keeps its promise while nodes come
and go: a join or a leave moves about 1/N of the keys (docs/hashing.md). Every key and
node name is hashed with a named algorithm (sha256 or md5: the first 8 bytes of the
digest, big-endian), so a key lands on the same node in every process; `SlotRing` is the
baseline design's 512-slot ring (docs/hashing.md), kept for comparison only.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from twlb.vocabulary import is_prime

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

    def walk(self, key: str) -> Iterator[str]:
        """Every point's node clockwise from `key`'s hash (nodes repeat, once per point)."""
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
            return next(iter(self.walk(key)))
        allowed = set(allowed)
        if allowed.isdisjoint(self.nodes):
            return None
        return next(n for n in self.walk(key) if n in allowed)

    def successors(self, key: str, count: int, allowed: Iterable[str] | None = None) -> list[str]:
        """The first `count` distinct nodes clockwise from `key` (fewer if there are not)."""
        allow = None if allowed is None else set(allowed)
        out: list[str] = []
        for n in self.walk(key):
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


#: Maglev's lookup-table size unless told otherwise: a prime well above 100 x N for fleets
#: of up to about 650 backends, the paper's own choice (Eisenbud et al. 2016, 3.4). The
#: size stays fixed while backends come and go; that is what keeps a change's disruption
#: near 1/N (a table that grew with the fleet moved 84% of keys on one join).
MAGLEV_TABLE_SIZE = 65_537


def maglev_table(
    nodes: Sequence[str], size: int = MAGLEV_TABLE_SIZE, algorithm: str = "sha256"
) -> list[str]:
    """Maglev's lookup table (Eisenbud et al. 2016): each node fills the slots of its own
    permutation (offset + j x skip mod M) in turn until every slot is taken, so each node
    holds M/N slots give or take one."""
    if not nodes:
        return []
    m = size
    if not is_prime(m):
        raise ValueError(f"a Maglev table size must be prime, got {m}")
    if len(nodes) > m:
        raise ValueError(f"a Maglev table of {m} slots cannot hold {len(nodes)} nodes")
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
    """Maglev lookup over a node set, with a table of a fixed prime size (65,537 unless
    told otherwise; at least 100 x N keeps each node's share within about 1% of 1/N).

    The table is built over the nodes (in sorted order: the same set gives the same table
    in every balancer) and rebuilt only when the set changes; the size never changes, so
    a join or a leave moves about 1/N of the keys. A lookup restricted to `allowed` nodes
    (a backend that is down, or already tried for this request) walks on from the key's
    slot to the next slot whose node is allowed: the keys of the nodes left out spread
    over the others, and no other key moves."""

    def __init__(self, algorithm: str = "sha256", size: int = MAGLEV_TABLE_SIZE) -> None:
        check_algorithm(algorithm)
        if not is_prime(size):
            raise ValueError(f"a Maglev table size must be prime, got {size}")
        self.algorithm = algorithm
        self.size = size
        self.nodes: tuple[str, ...] = ()
        self.table: list[str] = []

    def set_nodes(self, nodes: Iterable[str]) -> None:
        ordered = tuple(sorted(set(nodes)))  # order-free: the same set, the same table
        if ordered != self.nodes:
            self.table = maglev_table(ordered, self.size, self.algorithm) if ordered else []
            self.nodes = ordered

    def owner(self, key: str, allowed: Collection[str] | None = None) -> str | None:
        """The node of `key`; with `allowed`, the first allowed node from the key's slot on
        (None if no node is allowed)."""
        table = self.table
        if not table:
            return None
        m = len(table)
        slot = hash64(key, self.algorithm) % m
        node = table[slot]
        if allowed is None or node in allowed:
            return node
        allow = allowed if isinstance(allowed, set | frozenset) else set(allowed)
        if allow.isdisjoint(self.nodes):
            return None
        for step in range(1, m):
            node = table[(slot + step) % m]
            if node in allow:
                return node
        return None  # unreachable: an allowed node holds a slot

    def shares(self) -> dict[str, float]:
        """The fraction of the table (hence of keys) each node holds."""
        counts = Counter(self.table)
        return {n: counts[n] / len(self.table) for n in self.nodes}


class JumpSlots:
    """Jump consistent hashing (Lamping and Veach 2014) over nodes that come and go
    anywhere in the list, not only at its end.

    Jump hash maps a key to a bucket in [0, n) and moves only the keys of a bucket added
    or removed at the end. So each node keeps its bucket for as long as it stays: one that
    leaves leaves a hole, and a key whose bucket is a hole (or a node not `allowed`: down,
    or already tried) draws again with the next hash of the same key, landing on a random
    other bucket; a node that joins takes the first hole, else a new bucket at the end. A
    leave moves only the leaver's keys and a join only the keys its bucket takes, about
    1/N either way, wherever it is in the list. Buckets follow the order nodes joined in:
    balancers given the same list, or the same changes in the same order, agree. When holes
    outnumber the nodes the buckets are packed (keys move then, once), so a draw finds a
    node with a chance of at least one half.
    """

    #: Draws before a lookup walks the buckets in order (reached with a chance of at most
    #: (1/2)^64 when every node is allowed: holes never outnumber the nodes).
    MAX_DRAWS = 64

    def __init__(self, algorithm: str = "sha256") -> None:
        check_algorithm(algorithm)
        self.algorithm = algorithm
        self.slots: list[str | None] = []

    @property
    def nodes(self) -> list[str]:
        return [s for s in self.slots if s is not None]

    def set_nodes(self, nodes: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(nodes))
        keep = set(wanted)
        slots = [s if s in keep else None for s in self.slots]
        placed = {s for s in slots if s is not None}
        holes = [i for i, s in enumerate(slots) if s is None]
        holes.reverse()  # pop() takes the first hole
        for node in wanted:
            if node in placed:
                continue
            if holes:
                slots[holes.pop()] = node
            else:
                slots.append(node)
        if len(slots) > 2 * len(keep):
            slots = [s for s in slots if s is not None]
        self.slots = slots

    def bucket(self, node: str) -> int | None:
        try:
            return self.slots.index(node)
        except ValueError:
            return None

    def owner(self, key: str, allowed: Collection[str] | None = None) -> str | None:
        """The node of `key`: its jump bucket's, drawing again past holes and nodes that
        are not `allowed` (None if no node is allowed)."""
        slots = self.slots
        n = len(slots)
        if not n:
            return None
        h = hash64(key, self.algorithm)
        for draw in range(1, self.MAX_DRAWS + 1):
            node = slots[jump_hash(h, n)]
            if node is not None and (allowed is None or node in allowed):
                return node
            h = hash64(f"{key}#{draw}", self.algorithm)
        start = jump_hash(h, n)
        for step in range(n):
            node = slots[(start + step) % n]
            if node is not None and (allowed is None or node in allowed):
                return node
        return None


def bounded_capacity(total_load: int, node_count: int, balance_factor: float) -> int:
    """The most load one node may carry after one more unit is placed: ceil(c (L + 1) / N),
    the paper's capacity with L + 1 the load including the unit being placed."""
    return math.ceil(balance_factor * (total_load + 1) / node_count)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where bounded loads put one unit of load, and why."""

    node: str  # where it goes
    home: str  # the key's own node (the first allowed one clockwise)
    bound: int  # the capacity: the most any node may carry once it is placed
    load: int  # the chosen node's load before the placement (below `bound`)


def bounded_load_place(
    ring: HashRing,
    key: str,
    loads: Mapping[str, int],
    balance_factor: float = 1.25,
    allowed: Iterable[str] | None = None,
) -> Placement | None:
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam 2018): the
    key goes to its own node whenever that node's load is under the capacity
    ceil(c (L + 1) / N), else to the next node clockwise that is; so after every placement
    no node carries more than the capacity (under c x mean + 1). L and N are over the
    `allowed` nodes (default: all). None when no node is allowed."""
    if balance_factor < 1.0:
        raise ValueError(f"balance factor must be at least 1, got {balance_factor}")
    nodes = set(ring.nodes)
    allow = nodes if allowed is None else nodes.intersection(allowed)
    if not allow:
        return None
    cap = bounded_capacity(sum(loads.get(n, 0) for n in allow), len(allow), balance_factor)
    home: str | None = None
    for n in ring.walk(key):
        if n not in allow:
            continue
        if home is None:
            home = n
        load = loads.get(n, 0)
        if load < cap:
            return Placement(n, home, cap, load)
    raise AssertionError("unreachable: the capacity always leaves room on some node")


def bounded_load_owner(
    ring: HashRing,
    key: str,
    loads: Mapping[str, int],
    balance_factor: float = 1.25,
    allowed: Iterable[str] | None = None,
) -> str | None:
    """The node `bounded_load_place` puts `key` on (None if no node is allowed)."""
    placed = bounded_load_place(ring, key, loads, balance_factor, allowed)
    return None if placed is None else placed.node


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
