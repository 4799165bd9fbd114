"""The gossip messages on the wire: compact JSON (orjson), decoded with every field
checked and every size bounded, whatever a peer sends.

A datagram over `max_bytes`, of an unknown type, with a field of the wrong type, an id
over 255 characters, a number outside 0..2^63 (a health multiplier outside 1..255), or
more entries than allowed (in a table, in a row's suspect list, or in an update list) is
refused with a `WireError` naming what is wrong; the agent counts it and drops it.
Optional fields (an update's health, a row's suspects, a table's join flag) are left out
when they hold their default, so that the common messages stay as small as before.
"""

from __future__ import annotations

from typing import Any

import orjson
from twlb.gossip.membership import MemberState
from twlb.gossip.messages import (
    Ack,
    Gossip,
    HeartbeatEntry,
    HeartbeatTable,
    Message,
    Nack,
    Ping,
    PingReq,
    Sync,
    Update,
    Verdict,
)

#: memberlist's UDP buffer is 1,400 bytes; whole heartbeat tables and full-state syncs
#: need more, so a datagram may carry up to this (below UDP's 65,507-byte payload).
MAX_DATAGRAM = 65_000
MAX_ID = 255
MAX_INT = 2**63 - 1
MAX_HEALTH = 255
STATE_CODE = {
    MemberState.ALIVE: "a",
    MemberState.SUSPECT: "s",
    MemberState.DEAD: "d",
    MemberState.LEFT: "l",
}
CODE_STATE = {v: k for k, v in STATE_CODE.items()}


class WireError(ValueError):
    """A datagram that is not a valid gossip message; the text says why."""


def _updates(updates: tuple[Update, ...]) -> list[list[Any]]:
    return [
        [u.node, STATE_CODE[u.state], u.incarnation, u.source]
        if u.health == 1
        else [u.node, STATE_CODE[u.state], u.incarnation, u.source, u.health]
        for u in updates
    ]


def _entry(e: HeartbeatEntry) -> list[Any]:
    row: list[Any] = [e.node, e.generation, e.heartbeat, int(e.left)]
    if e.suspects:
        row.append(list(e.suspects))
    return row


def encode(message: Message) -> bytes:
    if isinstance(message, HeartbeatTable):
        body: dict[str, Any] = {
            "t": "hb",
            "s": message.sender,
            "r": message.round,
            "e": [_entry(e) for e in message.entries],
        }
        if message.join:
            body["j"] = True
    elif isinstance(message, Verdict):
        body = {
            "t": "vd",
            "s": message.sender,
            "n": message.node,
            "g": message.generation,
            "h": message.heartbeat,
        }
    elif isinstance(message, Ping):
        body = {"t": "ping", "q": message.seq, "g": message.target, "u": _updates(message.updates)}
    elif isinstance(message, PingReq):
        body = {"t": "preq", "q": message.seq, "g": message.target, "u": _updates(message.updates)}
    elif isinstance(message, Ack):
        body = {"t": "ack", "q": message.seq, "u": _updates(message.updates)}
    elif isinstance(message, Nack):
        body = {"t": "nack", "q": message.seq}
    elif isinstance(message, Gossip):
        body = {"t": "gsp", "u": _updates(message.updates)}
    elif isinstance(message, Sync):
        body = {"t": "sync", "u": _updates(message.states), "r": message.reply}
    else:
        raise TypeError(f"not a gossip message: {type(message).__name__}")
    return orjson.dumps(body)


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise WireError(f"{what} must be a string of 1..{MAX_ID} characters")
    return value


def _int(value: Any, what: str, low: int = 0, high: int = MAX_INT) -> int:
    if type(value) is not int or not low <= value <= high:
        top = "2^63-1" if high == MAX_INT else str(high)
        raise WireError(f"{what} must be an integer in {low}..{top}")
    return value


def _list(body: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list):
        raise WireError(f"field {key!r} must be a list")
    if len(value) > limit:
        raise WireError(f"field {key!r} has {len(value)} entries, at most {limit} allowed")
    return value


def _decode_updates(body: dict[str, Any], limit: int) -> tuple[Update, ...]:
    out = []
    for row in _list(body, "u", limit):
        if not isinstance(row, list) or len(row) not in (4, 5):
            raise WireError("an update must be [node, state, incarnation, source, health?]")
        state = CODE_STATE.get(row[1]) if isinstance(row[1], str) else None
        if state is None:
            raise WireError(f"unknown member state {row[1]!r}")
        health = _int(row[4], "health", 1, MAX_HEALTH) if len(row) == 5 else 1
        out.append(
            Update(
                _id(row[0], "node"),
                state,
                _int(row[2], "incarnation"),
                _id(row[3], "source"),
                health,
            )
        )
    return tuple(out)


def _suspects(value: Any, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WireError("a row's suspects must be a list")
    if len(value) > limit:
        raise WireError(f"a row names {len(value)} suspects, at most {limit} allowed")
    return tuple(_id(v, "suspect") for v in value)


def decode(data: bytes, *, max_bytes: int = MAX_DATAGRAM, max_entries: int = 1024) -> Message:
    """One datagram to a message, or a WireError saying what is wrong with it."""
    if len(data) > max_bytes:
        raise WireError(f"datagram of {len(data)} bytes, at most {max_bytes} allowed")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise WireError(f"not JSON: {err}") from None
    if not isinstance(body, dict):
        raise WireError("a message must be a JSON object")
    kind = body.get("t")
    if kind == "hb":
        entries = []
        for row in _list(body, "e", max_entries):
            if not isinstance(row, list) or len(row) not in (4, 5) or row[3] not in (0, 1):
                raise WireError(
                    "an entry must be [node, generation, heartbeat, left 0|1, suspects?]"
                )
            entries.append(
                HeartbeatEntry(
                    _id(row[0], "node"),
                    _int(row[1], "generation", -1),
                    _int(row[2], "heartbeat", -1),
                    bool(row[3]),
                    _suspects(row[4], max_entries) if len(row) == 5 else (),
                )
            )
        join = body.get("j", False)
        if not isinstance(join, bool):
            raise WireError("field 'j' must be true or false")
        return HeartbeatTable(
            _id(body.get("s"), "sender"), _int(body.get("r"), "round"), tuple(entries), join
        )
    if kind == "vd":
        return Verdict(
            _id(body.get("s"), "sender"),
            _id(body.get("n"), "node"),
            _int(body.get("g"), "generation", -1),
            _int(body.get("h"), "heartbeat", -1),
        )
    if kind in ("ping", "preq"):
        cls = Ping if kind == "ping" else PingReq
        return cls(
            _int(body.get("q"), "seq"),
            _id(body.get("g"), "target"),
            _decode_updates(body, max_entries),
        )
    if kind == "ack":
        return Ack(_int(body.get("q"), "seq"), _decode_updates(body, max_entries))
    if kind == "nack":
        return Nack(_int(body.get("q"), "seq"))
    if kind == "gsp":
        return Gossip(_decode_updates(body, max_entries))
    if kind == "sync":
        reply = body.get("r")
        if not isinstance(reply, bool):
            raise WireError("field 'r' must be true or false")
        return Sync(_decode_updates(body, max_entries), reply)
    raise WireError(f"unknown message type {kind!r}")
