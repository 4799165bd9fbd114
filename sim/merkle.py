"""Merkle trees over key ranges, for anti-entropy between replicas (as Dynamo and
Cassandra repair): two replicas compare the roots of trees over the keys they share
and walk down only where digests differ, so replicas that agree exchange one digest and
replicas that differ in a few keys exchange those keys' records and a few digests per
level, not their whole stores.

A tree has `depth` levels below the root and `fanout` children per node; a key's leaf
is fixed by the hash of the key alone (`leaf_of`), so two replicas place the same key in
the same leaf whatever else they hold. A leaf's digest covers its keys and their
record digests in key order; an inner node's covers its children's; an empty subtree's
digest is `EMPTY`. Sans-IO and deterministic: built from plain (key, digest) pairs.

    mine = MerkleTree(pairs_here)
    theirs_root = ...                     # from the peer
    if mine.digest(()) != theirs_root:   # then compare children, level by level
        mine.children(())                 # [(path, digest), ...]

A hand-written tree: the Merkle libraries on PyPI build append-only logs (certificate
transparency, RFC 9162) or blockchain proofs; a keyed range tree for comparing two
mutable stores is these few lines over hashlib.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

Path = tuple[int, ...]  # child indices from the root; () is the root
EMPTY = hashlib.sha256(b"empty").digest()


def leaf_of(key: str, depth: int, fanout: int) -> Path:
    """The leaf a key belongs to: base-`fanout` digits of the key's hash."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    path = []
    for _ in range(depth):
        h, digit = divmod(h, fanout)
        path.append(digit)
    return tuple(path)


class MerkleTree:
    """A hash tree over (key, digest) pairs; see the module docstring."""

    def __init__(self, items: Iterable[tuple[str, bytes]], depth: int = 3, fanout: int = 4):
        if depth < 1 or fanout < 2:
            raise ValueError(
                f"a Merkle tree needs depth >= 1 and fanout >= 2, got {depth}, {fanout}"
            )
        self.depth = depth
        self.fanout = fanout
        self._leaves: dict[Path, list[tuple[str, bytes]]] = {}
        for key, digest in items:
            self._leaves.setdefault(leaf_of(key, depth, fanout), []).append((key, digest))
        self._digests: dict[Path, bytes] = {}
        for path, entries in self._leaves.items():
            entries.sort()
            h = hashlib.sha256()
            for key, digest in entries:
                h.update(key.encode() + b"\0" + digest)
            self._digests[path] = h.digest()
        for level in range(depth - 1, -1, -1):
            parents = {p[:level] for p in self._digests if len(p) == level + 1}
            for parent in parents:
                h = hashlib.sha256()
                for child in range(fanout):
                    h.update(self._digests.get((*parent, child), EMPTY))
                self._digests[parent] = h.digest()

    def digest(self, path: Path = ()) -> bytes:
        return self._digests.get(path, EMPTY)

    def is_leaf(self, path: Path) -> bool:
        return len(path) >= self.depth

    def children(self, path: Path) -> list[tuple[Path, bytes]]:
        return [((*path, i), self.digest((*path, i))) for i in range(self.fanout)]

    def keys(self, path: Path) -> list[str]:
        """The keys under `path`."""
        n = len(path)
        return [k for leaf, entries in self._leaves.items() if leaf[:n] == path for k, _ in entries]


def differing_leaves(a: MerkleTree, b: MerkleTree) -> list[Path]:
    """The leaves whose digests differ, found by walking down from the root where the
    two trees differ (what two replicas do by messages, here in one process)."""
    if (a.depth, a.fanout) != (b.depth, b.fanout):
        raise ValueError("trees of different shapes cannot be compared")
    out, frontier = [], [()]
    while frontier:
        path = frontier.pop()
        if a.digest(path) == b.digest(path):
            continue
        if a.is_leaf(path):
            out.append(path)
        else:
            frontier.extend(p for p, _ in a.children(path))
    return sorted(out)


__all__ = ["EMPTY", "MerkleTree", "Path", "differing_leaves", "leaf_of"]
