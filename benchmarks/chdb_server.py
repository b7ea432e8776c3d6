"""Insert throughput: clickhouse-connect through ``sensorhub chdb-server`` vs chdb in-process.

Readings-like 10k-row batches (LowCardinality device and metric, DateTime64(6)
ts, Float64 value, UInt8 quality, UInt64 seq), three runs, side by side:

- ``client_insert``: ``client.insert(...)`` of Python columns, as the writer
  does (client-side Native encoding + HTTP + server + engine);
- ``client_raw_native``: ``client.raw_insert(...)`` of the same batches
  already encoded as Native (HTTP + server + engine);
- ``direct_send_insert``: the same Native bytes into chdb in this process with
  ``send_insert`` (engine only);
- ``direct_file``: the same bytes written to a file and inserted with
  ``INSERT ... SELECT * FROM file(path, Native)`` (engine only).

The Native bytes are the server's own ``FORMAT Native`` output of the rows
the first path inserted, so every path writes identical data. Writes JSON to
benchmarks/results/chdb_server.json and prints it. Bounded: a few seconds.

    .venv/bin/python benchmarks/chdb_server.py [--batches 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import clickhouse_connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kit.services import ManagedProcess, start_chdb_server

ROWS_PER_BATCH = 10_000
DDL = """
CREATE TABLE {table} (
    device LowCardinality(String),
    metric LowCardinality(String),
    ts DateTime64(6, 'UTC'),
    value Float64,
    quality UInt8,
    seq UInt64
) ENGINE = MergeTree ORDER BY (device, metric, ts, seq)
"""
COLUMNS = ["device", "metric", "ts", "value", "quality", "seq"]
T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def batch_columns(index: int) -> list[list[Any]]:
    """One batch of readings as Python columns: 200 devices, 8 metrics, 1 ms apart."""
    base = index * ROWS_PER_BATCH
    seqs = range(base, base + ROWS_PER_BATCH)
    return [
        [f"line-{s % 200:03d}" for s in seqs],
        [f"m{s % 8}" for s in seqs],
        [T0 + dt.timedelta(milliseconds=s) for s in seqs],
        [(s % 1000) * 0.1 for s in seqs],
        [s % 3 for s in seqs],
        list(seqs),
    ]


def start_server(run_dir: Path) -> ManagedProcess:
    env = {**os.environ, "SENSORHUB_LOG_LEVEL": "WARNING"}
    return start_chdb_server(run_dir, data=run_dir / "data", log_path=run_dir / "server.log", env=env)


def rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=10, help="10k-row batches per run and path")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chdb_server.json"))
    args = ap.parse_args()
    batches = [batch_columns(i) for i in range(args.batches)]
    rows_per_run = args.batches * ROWS_PER_BATCH

    from chdb import session  # the in-process engine, for the direct paths

    with tempfile.TemporaryDirectory(prefix="bench-chdb-") as tmp:
        tmp_path = Path(tmp)
        server = start_server(tmp_path / "server")
        client = clickhouse_connect.get_client(dsn=server.url)
        direct = session.Session(str(tmp_path / "direct"))
        runs: list[dict[str, Any]] = []
        try:
            client.command("CREATE DATABASE IF NOT EXISTS bench")
            direct.query("CREATE DATABASE IF NOT EXISTS bench")
            natives: list[bytes] = []
            for run in range(args.runs):
                result: dict[str, Any] = {"run": run + 1}
                for name in ("client_insert", "client_raw_native"):
                    client.command(DDL.format(table=f"bench.{name}_{run}"))
                for name in ("direct_send_insert", "direct_file"):
                    direct.query(DDL.format(table=f"bench.{name}_{run}"))

                t = time.perf_counter()
                for cols in batches:
                    client.insert(f"bench.client_insert_{run}", cols, column_names=COLUMNS, column_oriented=True)
                result["client_insert"] = rate(rows_per_run, time.perf_counter() - t)

                if not natives:  # the server's own Native encoding of exactly these rows
                    for i in range(args.batches):
                        lo, hi = i * ROWS_PER_BATCH, (i + 1) * ROWS_PER_BATCH - 1
                        natives.append(
                            client.raw_query(
                                f"SELECT {', '.join(COLUMNS)} FROM bench.client_insert_0 "
                                f"WHERE seq BETWEEN {lo} AND {hi} ORDER BY seq",
                                fmt="Native",
                            )
                        )

                t = time.perf_counter()
                for blob in natives:
                    client.raw_insert(f"bench.client_raw_native_{run}", COLUMNS, insert_block=blob, fmt="Native")
                result["client_raw_native"] = rate(rows_per_run, time.perf_counter() - t)

                t = time.perf_counter()
                for blob in natives:
                    ins = direct.send_insert(f"INSERT INTO bench.direct_send_insert_{run} ({', '.join(COLUMNS)})", "Native")
                    ins.append(blob)
                    ins.finish()
                result["direct_send_insert"] = rate(rows_per_run, time.perf_counter() - t)

                t = time.perf_counter()
                for i, blob in enumerate(natives):
                    path = tmp_path / f"batch-{i}.native"
                    path.write_bytes(blob)
                    direct.query(
                        f"INSERT INTO bench.direct_file_{run} SELECT * FROM file('{path}', Native)", "TSV"
                    )
                    path.unlink()
                result["direct_file"] = rate(rows_per_run, time.perf_counter() - t)
                runs.append(result)

            for name in ("client_insert", "client_raw_native"):
                counts = {client.command(f"SELECT count() FROM bench.{name}_{r}") for r in range(args.runs)}
                assert counts == {rows_per_run}, (name, counts)
            for name in ("direct_send_insert", "direct_file"):
                counts = {
                    int(direct.query(f"SELECT count() FROM bench.{name}_{r}", "TSV").bytes())
                    for r in range(args.runs)
                }
                assert counts == {rows_per_run}, (name, counts)
        finally:
            client.close()
            direct.close()
            server.terminate()

    paths = ("client_insert", "client_raw_native", "direct_send_insert", "direct_file")
    report = {
        "benchmark": "chdb_server insert throughput",
        "unit": "rows/s",
        "rows_per_batch": ROWS_PER_BATCH,
        "batches_per_run": args.batches,
        "runs": [{k: (round(v) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
        "median": {p: round(statistics.median(r[p] for r in runs)) for p in paths},
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
