"""Malformed trade frames injected into a recorded capture, and captures written back to disk.

For each venue a real trade frame of its capture is the template. Three
mutations make it yield no trade: a field of the wrong type (the first
trade's price is ``"abc"``), a wrong shape (the trade list or object replaced
by ``"x"``), a missing field (the first trade's id removed, or its array cut
short). Each is written in three spellings (compact, spaced, and keys reversed
or indented), since a parser that recognises its trade frames by their usual
byte prefix would let the other spellings through as "other channels". A
recorded control message (a subscription ack, a heartbeat, an info event) is
injected respelled too: it must not become a dead letter.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from exchange_kit import capture
from test_replay_venues import expected_trades, served_connection, text_of

from sensorhub.replay import Capture, CaptureConnection, CaptureRecord

#: Per capture: the path to the trade list (or the one trade object) in a trade message, and in a trade
#: the price and the id (keys of an object, or indices of an array).
TRADES_AT: dict[str, tuple[tuple[Any, ...], bool, Any, Any]] = {
    # exchange: (path to the trades, is a list of trades, price key, id key)
    "BINANCE": (("data",), False, "p", "a"),
    "OKX": (("data",), True, "px", "tradeId"),
    "COINBASE": (("events", 0, "trades"), True, "price", "trade_id"),
    "KRAKEN": ((1,), True, 0, None),  # v1 entries: [price, volume, time, side, ...], no id: cut short instead
    "BYBIT": (("data",), True, "p", "i"),
    "BITFINEX": ((1,), True, 3, None),  # [ID, MTS, AMOUNT, PRICE]: cut short instead
    "BITSTAMP": (("data",), False, "price", "id"),
    "GEMINI": (("trades",), True, "price", "tid"),
    "KUCOIN": (("data",), False, "price", "tradeId"),
    "GATEIO": (("result",), False, "price", "id"),
    "HUOBI": (("tick", "data"), True, "price", "tradeId"),
}
#: What the dead letter's reason must name, per mutation (any of the words, case-insensitive).
REASON_WORDS = {
    "wrong type": ("float", "abc", "number"),
    "wrong shape": ("array", "object", "kind", "expected"),
    "missing field": ("missing", "fewer", "length", "expected"),
}


@dataclass
class Injected:
    """A capture with malformed trade frames and respelled control messages injected into one connection."""

    capture: Capture
    connection: CaptureConnection  # the injected one (a trade feed's)
    original: CaptureConnection
    bad: dict[bytes, str]  # raw frame -> the mutation it carries
    control: list[bytes]  # respelled control messages (must not become dead letters)


def _get(msg: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        msg = msg[k]
    return msg


def _set(msg: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(msg, path[:-1])[path[-1]] = value


def _bitfinex_trade_channels(frames: list[str | bytes]) -> dict[int, str]:
    chans = {}
    for raw in frames:
        msg = json.loads(text_of(raw))
        if isinstance(msg, dict) and msg.get("event") == "subscribed" and msg.get("channel") == "trades":
            chans[msg["chanId"]] = msg["symbol"]
    return chans


def template_index(exchange: str, frames: list[str | bytes]) -> int:
    """Index of the first recorded frame holding a trade (an independent reading)."""
    if exchange == "BITFINEX":
        chans = _bitfinex_trade_channels(frames)
        for i, raw in enumerate(frames):
            msg = json.loads(text_of(raw))
            if isinstance(msg, list) and msg[0] in chans and isinstance(msg[1], list) and msg[1]:
                return i
        raise AssertionError("no Bitfinex trades snapshot")
    for i in range(len(frames)):
        if any(expected_trades(exchange, frames[i : i + 1]).values()):
            return i
    raise AssertionError(f"no trade frame in the {exchange} capture")


def _template(exchange: str, frames: list[str | bytes], i: int) -> Any:
    msg = json.loads(text_of(frames[i]))
    if exchange == "BITFINEX":
        msg = msg[:2]  # no message sequence number: the injected frames must not look like a gap
    if exchange == "GEMINI":
        # the book part is of no interest here; keep the frame small
        msg = {"type": msg["type"], "symbol": msg["symbol"], "changes": [], "trades": msg["trades"][:3]}
    return msg


def mutations(exchange: str, msg: Any) -> dict[str, Any]:
    """The three malformed copies of the template message, by mutation."""
    path, is_list, price, tid = TRADES_AT[exchange]
    out: dict[str, Any] = {}

    def first(m: Any) -> Any:
        held = _get(m, path)
        return held[0] if is_list else held

    m = copy.deepcopy(msg)
    first(m)[price] = "abc"
    out["wrong type"] = m
    m = copy.deepcopy(msg)
    _set(m, path, "x")
    out["wrong shape"] = m
    m = copy.deepcopy(msg)
    t = first(m)
    if tid is None:
        del t[2:]
    else:
        del t[tid]
    out["missing field"] = m
    return out


def spellings(msg: Any) -> list[str]:
    """Compact, spaced, and keys reversed (objects) or indented (arrays)."""
    third = (
        json.dumps(dict(reversed(list(msg.items()))), separators=(",", ":"))
        if isinstance(msg, dict)
        else json.dumps(msg, indent=1)
    )
    return [json.dumps(msg, separators=(",", ":")), json.dumps(msg), third]


def _control_frame(exchange: str, frames: list[str | bytes]) -> Any | None:
    """A small recorded frame that is not a trade frame, preferably one naming the trade channel."""
    candidates = []
    for raw in frames:
        text = text_of(raw)
        if len(text) > 400 or any(expected_trades(exchange, [raw]).values()):
            continue
        msg = json.loads(text)
        if exchange == "HUOBI" and isinstance(msg, dict) and "ping" in msg:
            continue  # answered by the feed thread, never parsed
        if exchange == "BITFINEX" and isinstance(msg, list):
            msg = msg[:2] if msg[1] == "hb" else msg  # no sequence number
        candidates.append((0 if "trade" in text.lower() else 1, msg))
    return min(candidates, key=lambda c: c[0])[1] if candidates else None


def _encode(exchange: str, text: str) -> str | bytes:
    return gzip.compress(text.encode(), mtime=0) if exchange == "HUOBI" else text


def inject(exchange: str) -> Injected:
    """The venue's capture with nine malformed trade frames and a respelled control message in its trade feed."""
    cap = capture(exchange)
    conn = served_connection(exchange)
    frames = conn.frames()
    i = template_index(exchange, frames)
    msg = _template(exchange, frames, i)
    bad: dict[bytes, str] = {}
    for kind, m in mutations(exchange, msg).items():
        for text in spellings(m):
            raw = _encode(exchange, text)
            bad[raw if isinstance(raw, bytes) else raw.encode()] = kind
    control: list[bytes] = []
    ctl = _control_frame(exchange, frames)
    extra: list[str | bytes] = [raw if exchange == "HUOBI" else raw.decode() for raw in bad]
    if ctl is not None:
        raw_ctl = _encode(exchange, json.dumps(ctl))
        control.append(raw_ctl if isinstance(raw_ctl, bytes) else raw_ctl.encode())
        extra.insert(len(extra) // 2, raw_ctl)
    # Spread the injected frames over the recording after the template frame.
    recs = list(conn.records)
    recv_at = [k for k, r in enumerate(recs) if r.kind == "recv"]
    after = recv_at[i + 1 :] or [recv_at[-1]]
    step = max(1, len(after) // (len(extra) + 1))
    positions = [after[min(len(after) - 1, step * (n + 1) - 1)] for n in range(len(extra))]
    out: list[CaptureRecord] = []
    pending: dict[int, list[str | bytes]] = {}
    for pos, frame in zip(positions, extra, strict=True):
        pending.setdefault(pos, []).append(frame)
    for k, r in enumerate(recs):
        out.append(r)
        for frame in pending.get(k, ()):
            out.append(CaptureRecord("recv", r.ts, frame))
    injected = CaptureConnection(conn.conn_id, conn.addr, out)
    conns = [injected if c is conn else c for c in cap.connections]
    return Injected(Capture(cap.exchange, cap.header, conns, cap.http), injected, conn, bad, control)


def reason_names_problem(kind: str, reason: str) -> bool:
    """True when a dead letter's reason names the problem of the ``kind`` mutation."""
    low = reason.lower()
    return "trade frame" in low and any(w in low for w in REASON_WORDS[kind])


def write_capture(cap: Capture, path: Path) -> Path:
    """Write ``cap`` in the capture layout (zstd JSON Lines), connection after connection."""
    lines = [json.dumps(cap.header)]
    for h in cap.http:
        lines.append(json.dumps({"t": "http", "conn": f"{cap.exchange}.http.x", "ts": h.ts, "url": h.url, "data": h.body}))
    for c in cap.connections:
        first_ts = c.records[0].ts if c.records else 0.0
        lines.append(json.dumps({"t": "connect", "conn": c.conn_id, "ts": first_ts, "addr": c.addr}))
        for r in c.records:
            rec: dict[str, Any] = {"t": r.kind, "conn": c.conn_id, "ts": r.ts}
            if isinstance(r.data, bytes):
                rec["b64"] = base64.b64encode(r.data).decode()
            else:
                rec["data"] = r.data
            if r.kind == "send":
                rec["addr"] = c.addr
            lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        w.write(text.encode())
    path.write_bytes(buf.getvalue())
    return path



# --------------------------------------------------------------------------- Bybit with its spot connection

#: Spot trades of the hand-made spot connection: (symbol, number of pushes, trades per push).
BYBIT_SPOT = (("BTCUSDT", 7, 2), ("ETHUSDT", 5, 3))


def bybit_spot_connection(start_ts: float) -> CaptureConnection:
    """Bybit's v5 spot connection as the recorder would have stored it after the linear one.

    The capture's spot connection fell beyond its cut, so this one is written
    by hand in the venue's documented spot format: subscribe requests, their
    acknowledgements, a pong, and ``publicTrade`` pushes with numeric trade
    ids (spot) for ``BTCUSDT`` and ``ETHUSDT``, the very spellings of the two
    linear perpetuals in the same recording.
    """
    conn = CaptureConnection("BYBIT.ws.3", "wss://stream.bybit.com/v5/public/spot")
    ts = start_ts
    recs = conn.records
    for sym, _n, _k in BYBIT_SPOT:
        recs.append(CaptureRecord("send", ts, json.dumps({"op": "subscribe", "args": [f"publicTrade.{sym}"]},
                                                         separators=(",", ":"))))
        recs.append(CaptureRecord("recv", ts, '{"success":true,"ret_msg":"subscribe","conn_id":"spot-1","op":"subscribe"}'))
    recs.append(CaptureRecord("recv", ts, '{"op":"pong","args":["1786310819000"],"conn_id":"spot-1"}'))
    tid = 2290000000071848541
    for sym, pushes, per in BYBIT_SPOT:
        price = 65110.5 if sym == "BTCUSDT" else 1922.4
        for _ in range(pushes):
            ts += 0.25
            data = []
            for _ in range(per):
                tid += 1
                data.append({"i": str(tid), "T": int(ts * 1000), "p": f"{price:.2f}", "v": "0.0012", "S": "Buy",
                             "s": sym, "BT": False, "RPI": False})
            msg = {"topic": f"publicTrade.{sym}", "ts": int(ts * 1000), "type": "snapshot", "data": data}
            recs.append(CaptureRecord("recv", ts, json.dumps(msg, separators=(",", ":"))))
    return conn


def bybit_with_spot() -> Capture:
    """The Bybit capture with its spot connection stored after the linear one, as the recorder opened both."""
    cap = capture("BYBIT")
    linear = cap.connections[0]
    spot = bybit_spot_connection(linear.records[0].ts)
    return Capture(cap.exchange, cap.header, [*cap.connections, spot], cap.http)


def bybit_spot_trades() -> dict[str, int]:
    """Distinct spot trades per normalized symbol in :func:`bybit_spot_connection`."""
    return {f"{sym[:-4]}-USDT": pushes * per for sym, pushes, per in BYBIT_SPOT}
