"""Bytes per stored reading by column codec, after merges, and what the codecs cost in CPU.

For each candidate schema of ``readings`` (and of ``trades``) the same rows
are inserted into a fresh table of a chdb session, in INSERTs of the
writer's size with merges stopped, then ``OPTIMIZE TABLE ... FINAL`` merges
them into one part. Recorded per candidate:

- ``bytes_per_row``: ``bytes_on_disk`` of the active parts (every column,
  marks, primary index, checksums) per row, and ``columns``: each column's
  compressed data plus its marks per row (``other`` is the rest);
- ``insert_cpu_s`` / ``insert_cpu_ms_per_insert``: CPU time of this process
  (chdb's threads included) over all the INSERTs, and per INSERT;
- ``merge_cpu_s``: CPU time of the OPTIMIZE FINAL (reading, merging and
  compressing every row once more, as the background merges do).

Readings come from the simulator's own devices (``firmware_sim``): 200
devices publishing frames of 10 readings at 40,000 readings/s, signal
``walk`` (quantized random walks, as field sensors send) and ``random``
(drifting sines with noise: nearly every value distinct). ``ts`` is the
device time (each message 50 ms after the device's last, with up to 1 ms of
scheduling jitter), ``seq`` the frame's ``frame_seq × 65536 + index``,
``quality`` the frame's, ``recv`` the frame's receive time (0.3 ms plus an
exponential 0.7 ms after ``ts``, unique and increasing per source),
``inserted`` the writer's INSERT time (batches of 100 ms), ``source`` one
name. Trades are synthetic (the store's shapes of venues, symbols, ids,
tick-sized prices and lot-sized amounts) since no simulator makes them.

Writes benchmarks/results/storage.json (docs/performance.md renders its tables).
Bounded: 5 to 7 minutes on 2 cores at the default sizes (the committed run took 423 s
with other work on the box).

    .venv/bin/python benchmarks/storage.py [--readings 2500000] [--trades 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_sim.devices import make_devices

RATE = 40_000  # readings/s
DEVICES = 200
PER_MESSAGE = 10
BATCH_US = 100_000  # the writer's batch_ms
T0_US = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC

# Base types as the pipeline stores them (sensorhub/sinks/schema.py), codecs left to the candidates.
READING_COLUMNS = (
    ("device", "LowCardinality(String)"),
    ("metric", "LowCardinality(String)"),
    ("ts", "DateTime64(6, 'UTC')"),
    ("value", "Float64"),
    ("quality", "UInt8"),
    ("seq", "UInt64"),
    ("recv", "DateTime64(6, 'UTC')"),
    ("source", "LowCardinality(String)"),
    ("inserted", "DateTime64(6, 'UTC')"),
)
READING_KEY = "(device, metric, ts, seq)"

TRADE_COLUMNS = (
    ("venue", "LowCardinality(String)"),
    ("symbol", "LowCardinality(String)"),
    ("trade_id", "String"),
    ("price", "Float64"),
    ("amount", "Float64"),
    ("side", "Enum8('unknown' = 0, 'buy' = 1, 'sell' = 2)"),
    ("ts", "DateTime64(6, 'UTC')"),
    ("recv", "DateTime64(6, 'UTC')"),
    ("inserted", "DateTime64(6, 'UTC')"),
)
TRADE_KEY = "(venue, symbol, trade_id)"


def _all(codec: str, columns: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {c: codec for c, _ in columns}


def _typed(general: str, value: str = "Gorilla", times: str = "DoubleDelta", seq: str | None = None,
           quality: str = "") -> dict[str, str]:
    """Readings: a column-specific codec (``value``; ``times`` for ts, recv and inserted; ``seq``,
    ``times`` unless given; ``quality``), each chained with the general one; "" = the general alone."""

    def chain(first: str) -> str:
        return f"{first}, {general}" if first else general

    return {
        "device": general,
        "metric": general,
        "ts": chain(times),
        "value": chain(value),
        "quality": chain(quality),
        "seq": chain(times if seq is None else seq),
        "recv": chain(times),
        "source": general,
        "inserted": chain(times),
    }


# name -> (codec per column, ORDER BY); a column not named keeps the server default (LZ4)
READING_CANDIDATES: dict[str, tuple[dict[str, str], str]] = {
    "default_lz4": ({}, READING_KEY),
    "zstd1": (_all("ZSTD(1)", READING_COLUMNS), READING_KEY),
    "zstd3": (_all("ZSTD(3)", READING_COLUMNS), READING_KEY),
    "doubledelta_gorilla_lz4": (_typed("LZ4"), READING_KEY),
    "doubledelta_gorilla_zstd1": (_typed("ZSTD(1)"), READING_KEY),
    "doubledelta_gorilla_zstd3": (_typed("ZSTD(3)"), READING_KEY),
    "doubledelta_zstd1": (_typed("ZSTD(1)", value=""), READING_KEY),
    "delta_zstd1": (_typed("ZSTD(1)", value="", times="Delta"), READING_KEY),
    "delta_fpc_zstd1": (_typed("ZSTD(1)", value="FPC", times="Delta"), READING_KEY),
    "delta_delta_lz4": (_typed("LZ4", value="Delta", times="Delta"), READING_KEY),
    "delta_delta_zstd1": (_typed("ZSTD(1)", value="Delta", times="Delta"), READING_KEY),
    "delta_delta_zstd3": (_typed("ZSTD(3)", value="Delta", times="Delta"), READING_KEY),
    "t64_doubledelta_zstd1": (
        _typed("ZSTD(1)", value="DoubleDelta", times="T64", quality="T64"), READING_KEY
    ),
    # the same codecs with rows in time order: what the (device, metric, ts) key buys and costs
    "delta_delta_zstd1_time_order": (_typed("ZSTD(1)", value="Delta", times="Delta"), "(ts, device, metric, seq)"),
}
# the random shape's values are nearly incompressible; a few candidates show the range
RANDOM_CANDIDATES = ("default_lz4", "zstd1", "delta_zstd1", "delta_delta_zstd1", "delta_delta_zstd3")

TRADE_CANDIDATES: dict[str, tuple[dict[str, str], str]] = {
    "default_lz4": ({}, TRADE_KEY),
    "zstd1": (_all("ZSTD(1)", TRADE_COLUMNS), TRADE_KEY),
    "zstd3": (_all("ZSTD(3)", TRADE_COLUMNS), TRADE_KEY),
    "delta_zstd1": (
        {**_all("ZSTD(1)", TRADE_COLUMNS), "ts": "Delta, ZSTD(1)", "recv": "Delta, ZSTD(1)",
         "inserted": "Delta, ZSTD(1)"},
        TRADE_KEY,
    ),
    "doubledelta_gorilla_zstd1": (
        {**_all("ZSTD(1)", TRADE_COLUMNS), "ts": "DoubleDelta, ZSTD(1)", "recv": "DoubleDelta, ZSTD(1)",
         "inserted": "DoubleDelta, ZSTD(1)", "price": "Gorilla, ZSTD(1)", "amount": "Gorilla, ZSTD(1)"},
        TRADE_KEY,
    ),
    "delta_delta_zstd3": (
        {**_all("ZSTD(3)", TRADE_COLUMNS), "ts": "Delta, ZSTD(3)", "recv": "Delta, ZSTD(3)",
         "inserted": "Delta, ZSTD(3)", "price": "Delta, ZSTD(3)"},
        TRADE_KEY,
    ),
}

READING_STAGE = (
    "chunk UInt32, device UInt16, metric UInt8, ts DateTime64(6), value Float64, quality UInt8, "
    "seq UInt64, recv DateTime64(6), inserted DateTime64(6)"
)
_READING_DTYPE = np.dtype([
    ("chunk", "<u4"), ("device", "<u2"), ("metric", "u1"), ("ts", "<i8"), ("value", "<f8"), ("quality", "u1"),
    ("seq", "<u8"), ("recv", "<i8"), ("inserted", "<i8"),
])


def reading_rows(signal: str, n: int, rows_per_insert: int, seed: int = 1) -> np.ndarray:
    """``n`` readings as the pipeline stores them, in arrival order, chunked by INSERT."""
    devices = make_devices(DEVICES, {"frame": 1.0}, seed=seed, signal=signal)
    rng = random.Random(seed)
    period_us = DEVICES * PER_MESSAGE * 1_000_000 // RATE
    out = np.zeros(n, dtype=_READING_DTYPE)
    i = 0
    last_recv = 0
    rnd = 0
    while i < n:
        for d in devices:
            if i >= n:
                break
            nominal = T0_US + rnd * period_us + d.index * period_us // DEVICES
            msg = d.next_message(PER_MESSAGE, now_us=nominal + rng.randrange(1000))
            base = msg.readings[0][1]
            recv = max(last_recv + 1, base + 300 + int(rng.expovariate(1 / 700)))
            last_recv = recv
            # the frame's quality bytes: after the 27-byte header, at offset 6 of each 15-byte reading
            for j, (m, ts, seq, v) in enumerate(msg.readings[: n - i]):
                out[i] = (0, d.index, m + 1, ts, v, msg.payload[27 + 15 * j + 6], seq, recv, 0)
                i += 1
        rnd += 1
    # the writer's INSERT of each 100 ms of arrivals, a few ms after the batch closed
    batch = out["recv"] // BATCH_US
    jitter = np.array([rng.randrange(2000, 8000) for _ in range(int(batch.max() - batch.min()) + 1)])
    out["inserted"] = (batch + 1) * BATCH_US + jitter[batch - batch.min()]
    out["chunk"] = np.arange(n) // rows_per_insert
    return out


_TRADE_DTYPE = np.dtype([
    ("chunk", "<u4"), ("venue", "u1"), ("symbol", "u1"), ("trade_id", "<u8"), ("price", "<f8"),
    ("amount", "<f8"), ("side", "u1"), ("ts", "<i8"), ("recv", "<i8"), ("inserted", "<i8"),
])
TRADE_STAGE = (
    "chunk UInt32, venue UInt8, symbol UInt8, trade_id UInt64, price Float64, amount Float64, side UInt8, "
    "ts DateTime64(6), recv DateTime64(6), inserted DateTime64(6)"
)
VENUES = ("binance", "okx", "coinbase", "kraken", "kucoin")
SYMBOLS = (("BTC-USDT", 65_000.0, 0.01, 1e-5), ("ETH-USDT", 3_200.0, 0.01, 1e-4), ("SOL-USDT", 150.0, 0.001, 1e-3),
           ("XRP-USDT", 0.6, 0.0001, 0.1), ("BTC-USDT-PERP", 65_010.0, 0.1, 1e-3))


def trade_rows(n: int, rows_per_insert: int, seed: int = 1) -> np.ndarray:
    """``n`` trades: per venue and symbol a tick-sized price walk, lot-sized amounts, increasing ids."""
    rng = random.Random(seed)
    streams = [(v, s) for v in range(len(VENUES)) for s in range(len(SYMBOLS))]
    price = {k: SYMBOLS[k[1]][1] for k in streams}
    next_id = {k: rng.randrange(10**8, 10**10) for k in streams}
    out = np.zeros(n, dtype=_TRADE_DTYPE)
    t = T0_US
    for i in range(n):
        k = streams[min(int(rng.expovariate(0.25)), len(streams) - 1)]  # a few busy markets, a long tail
        _, p0, tick, lot = SYMBOLS[k[1]]
        if rng.random() < 0.3:
            price[k] = max(tick, price[k] + rng.choice((-1, 1)) * rng.randint(1, 3) * tick * max(1.0, p0 / 1000))
        ticks = round(price[k] / tick)
        t += int(rng.expovariate(1 / 500))  # 2,000 trades/s over all markets
        ts = t // 1000 * 1000  # exchanges send milliseconds
        next_id[k] += 1
        out[i] = (0, k[0], k[1], next_id[k], ticks * tick, max(1, round(rng.lognormvariate(2, 1.5))) * lot,
                  rng.choice((1, 2)), ts, t + 20_000 + int(rng.expovariate(1 / 10_000)), 0)
    out["inserted"] = (out["recv"] // BATCH_US + 1) * BATCH_US + 5000
    out["chunk"] = np.arange(n) // rows_per_insert
    return out


def _cpu() -> float:
    return time.process_time()


def _q(sess: Any, sql: str) -> str:
    return str(sess.query(sql, "TSVRaw")).strip()


def _ddl(table: str, columns: tuple[tuple[str, str], ...], codecs: dict[str, str], key: str) -> str:
    cols = ",\n    ".join(f"`{c}` {t}" + (f" CODEC({codecs[c]})" if codecs.get(c) else "") for c, t in columns)
    return (
        f"CREATE TABLE {table} (\n    {cols}\n) ENGINE = ReplacingMergeTree "
        # wide parts even when small, so system.parts_columns has every column's bytes (big parts are wide anyway)
        f"PARTITION BY toYYYYMM(ts) ORDER BY {key} SETTINGS min_bytes_for_wide_part = 0, min_rows_for_wide_part = 0"
    )


def measure(sess: Any, table: str, ddl: str, select: str, chunks: int) -> dict[str, Any]:
    """Insert the staged rows chunk by chunk (merges stopped), OPTIMIZE FINAL, read the parts."""
    sess.query(f"DROP TABLE IF EXISTS {table}")
    sess.query(ddl)
    sess.query(f"SYSTEM STOP MERGES {table}")
    c0, w0 = _cpu(), time.perf_counter()
    for k in range(chunks):
        sess.query(f"INSERT INTO {table} {select} WHERE chunk = {k}")
    c1, w1 = _cpu(), time.perf_counter()
    parts_before = int(_q(sess, f"SELECT count() FROM system.parts WHERE active AND table = '{table}'"))
    sess.query(f"SYSTEM START MERGES {table}")
    c2, w2 = _cpu(), time.perf_counter()
    sess.query(f"OPTIMIZE TABLE {table} FINAL")
    c3, w3 = _cpu(), time.perf_counter()
    rows, on_disk, parts = (
        int(x) for x in _q(
            sess, f"SELECT sum(rows), sum(bytes_on_disk), count() FROM system.parts WHERE active AND table = '{table}'"
        ).split("\t")
    )
    cols: dict[str, float] = {}
    data = 0
    for line in _q(
        sess,
        "SELECT column, sum(column_data_compressed_bytes + column_marks_bytes), sum(column_data_uncompressed_bytes) "
        f"FROM system.parts_columns WHERE active AND table = '{table}' GROUP BY column",
    ).splitlines():
        name, b, _raw = line.split("\t")
        cols[name] = round(int(b) / rows, 3)
        data += int(b)
    sess.query(f"DROP TABLE {table}")
    return {
        "rows": rows,
        "bytes_per_row": round(on_disk / rows, 3),
        "columns": cols,
        "other": round((on_disk - data) / rows, 3),
        "parts_before_merge": parts_before,
        "parts_after_merge": parts,
        "insert_cpu_s": round(c1 - c0, 3),
        "insert_cpu_ms_per_insert": round((c1 - c0) / chunks * 1000, 3),
        "insert_wall_s": round(w1 - w0, 3),
        "merge_cpu_s": round(c3 - c2, 3),
        "merge_wall_s": round(w3 - w2, 3),
    }


def stage(sess: Any, name: str, rows: np.ndarray, structure: str, tmp: Path) -> None:
    path = tmp / f"{name}.rowbinary"
    rows.tofile(path)
    sess.query(f"DROP TABLE IF EXISTS {name}")
    sess.query(
        f"CREATE TABLE {name} ENGINE = MergeTree ORDER BY chunk AS "
        f"SELECT * FROM file('{path}', RowBinary, '{structure}')"
    )
    path.unlink()


def run_readings(sess: Any, signal: str, n: int, rows_per_insert: int, tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = reading_rows(signal, n, rows_per_insert)
    gen_s = time.perf_counter() - t0
    stage(sess, f"stage_{signal}", rows, READING_STAGE, tmp)
    chunks = int(rows["chunk"].max()) + 1
    select = (
        "SELECT concat('dev-', leftPad(toString(device + 1), 4, '0')), concat('m', toString(metric)), ts, value, "
        f"quality, seq, recv, 'mqtt', inserted FROM stage_{signal}"
    )
    names = READING_CANDIDATES if signal == "walk" else {k: READING_CANDIDATES[k] for k in RANDOM_CANDIDATES}
    out: dict[str, Any] = {}
    for cand, (codecs, key) in names.items():
        r = measure(sess, f"readings_{cand}", _ddl(f"readings_{cand}", READING_COLUMNS, codecs, key), select, chunks)
        r["codecs"] = {c: codecs.get(c) or "LZ4 (default)" for c, _ in READING_COLUMNS}
        r["order_by"] = key
        out[cand] = r
        print(f"  readings/{signal}/{cand}: {r['bytes_per_row']} B/reading, insert {r['insert_cpu_s']} s CPU, "
              f"merge {r['merge_cpu_s']} s CPU", file=sys.stderr)
    sess.query(f"DROP TABLE stage_{signal}")
    return {"generated_s": round(gen_s, 1), "candidates": out}


def run_trades(sess: Any, n: int, rows_per_insert: int, tmp: Path) -> dict[str, Any]:
    rows = trade_rows(n, rows_per_insert)
    stage(sess, "stage_trades", rows, TRADE_STAGE, tmp)
    chunks = int(rows["chunk"].max()) + 1
    venues = "[" + ", ".join(f"'{v}'" for v in VENUES) + "]"
    symbols = "[" + ", ".join(f"'{s[0]}'" for s in SYMBOLS) + "]"
    # KuCoin's ids are hex strings, the others' decimal integers
    select = (
        f"SELECT {venues}[venue + 1], {symbols}[symbol + 1], "
        "if(venue = 4, lower(hex(toUInt128(trade_id) * 1000003)), toString(trade_id)), price, amount, "
        "CAST(side, 'Enum8(\\'unknown\\' = 0, \\'buy\\' = 1, \\'sell\\' = 2)'), ts, recv, inserted FROM stage_trades"
    )
    out: dict[str, Any] = {}
    for cand, (codecs, key) in TRADE_CANDIDATES.items():
        r = measure(sess, f"trades_{cand}", _ddl(f"trades_{cand}", TRADE_COLUMNS, codecs, key), select, chunks)
        r["codecs"] = {c: codecs.get(c) or "LZ4 (default)" for c, _ in TRADE_COLUMNS}
        r["order_by"] = key
        out[cand] = r
        print(f"  trades/{cand}: {r['bytes_per_row']} B/trade, insert {r['insert_cpu_s']} s CPU, "
              f"merge {r['merge_cpu_s']} s CPU", file=sys.stderr)
    sess.query("DROP TABLE stage_trades")
    return {"candidates": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=2_500_000, help="readings per signal (bounded: at most 5M)")
    ap.add_argument("--trades", type=int, default=300_000)
    ap.add_argument("--rows-per-insert", type=int, default=4_000,
                    help="rows per INSERT (the writer's 100 ms batch at 40,000 readings/s)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "storage.json"))
    args = ap.parse_args()
    if not 0 < args.readings <= 5_000_000:
        ap.error("--readings must be 1..5000000")

    from chdb import session

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        sess = session.Session(str(Path(tmp) / "db"))
        version = _q(sess, "SELECT version()")
        readings = {s: run_readings(sess, s, args.readings, args.rows_per_insert, Path(tmp)) for s in ("walk", "random")}
        trades = run_trades(sess, args.trades, args.rows_per_insert, Path(tmp))
        sess.close()
    result = {
        "benchmark": "storage: bytes per row after merges by column codec",
        "engine": f"chdb (ClickHouse {version})",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "readings_per_signal": args.readings,
        "trades_rows": args.trades,
        "rows_per_insert": args.rows_per_insert,
        "readings": readings,
        "trades": trades,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out} (docs/performance.md renders it: make bench-docs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
