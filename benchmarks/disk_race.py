"""Another program takes the data disk's last bytes while INSERTs are written: how many rows of
acknowledged INSERTs are lost, with and without the chdb-server's check of an INSERT's parts on a
low disk (sensorhub/chdb_server/engine.py).

The 2 % insert floor (``min_free_disk_ratio_to_perform_insert``) refuses an INSERT that starts
on a nearly full disk, but not one that is being written when something else fills the disk.
Each run, on a fresh tmpfs (``--disk-mb``) holding the data of a real chdb-server with
sensorhub's schema:

1. a file fills the disk to ``--leave-mb`` free (above the floor);
2. another thread of this process, standing for another program, fills the rest to the last
   byte, holds it ``--hold-s``, frees it, waits ``--gap-s``, and again, while ``--inserts``
   INSERTs of ``--rows`` readings each go to the server one after another, each under its own
   token, as the writer sends them (with sensorhub's client settings);
3. the filler stops, the file goes, and every refused INSERT is sent again under its token
   until it is accepted (at most ``--retry-s``), as the writer waits NOT_ENOUGH_SPACE out;
4. each acknowledged INSERT's rows are counted in ``readings`` and in ``readings_by_minute``
   (each INSERT holds a reading a minute of 200 devices, over minutes of its own), then again after a restart of the server.

Variants, runs alternating: ``check`` (the default, ``--verify-inserts-below`` 1 GiB) and
``no-check`` (``--verify-inserts-below 0``). Needs root (``mount``). Writes
``benchmarks/results/disk-race.json`` (``--out``). About a minute a run.

    .venv/bin/python benchmarks/disk_race.py [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import clickhouse_connect  # noqa: E402
from kit.disk import fill, free_bytes  # noqa: E402
from kit.results import write_results  # noqa: E402
from kit.services import start_chdb_server  # noqa: E402

from sensorhub.sinks.clickhouse import INSERT_SETTINGS  # noqa: E402
from sensorhub.sinks.schema import apply_schema  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "disk-race.json"
VARIANTS = {"check": [], "no-check": ["--verify-inserts-below", "0"]}
BASE = "toDateTime64('2026-12-01 00:00:00', 6)"


def _hog(path: Path, stop: threading.Event, hold_s: float, gap_s: float, fills: list[int]) -> None:
    """Fill the disk to the last byte, hold, free, wait; until ``stop``."""
    while not stop.is_set():
        try:
            with open(path, "ab") as f:
                while not stop.is_set():
                    f.write(b"\1" * (1 << 16))
                    f.flush()
        except OSError:
            fills[0] += 1
            stop.wait(hold_s)
            path.unlink(missing_ok=True)
            stop.wait(gap_s)


def _run(d: Path, variant: str, a: argparse.Namespace) -> dict[str, Any]:
    data = d / "chdb" / "data"
    data.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.disk_mb}m", "tmpfs", str(data)], check=True)
    server = start_chdb_server(d, extra=VARIANTS[variant])
    n = a.rows
    span = n // 200 * 60  # seconds of one INSERT's rows: a reading a minute for each of 200 devices
    insert = ("INSERT INTO sensorhub.readings (device, metric, ts, value, quality, seq, recv, source) "
              f"SELECT concat('d', toString(number % 200)), 'm', {BASE} + {{k}} * {span} + intDiv(number, 200) * 60, "
              "number, 0, number, now64(6), 'mqtt' FROM numbers({n})")
    try:
        c = clickhouse_connect.get_client(dsn=server.url, send_receive_timeout=120, settings=INSERT_SETTINGS)
        apply_schema(c, "sensorhub")

        def send(k: int) -> str:
            try:
                c.command(insert.format(k=k, n=n), settings={
                    "insert_deduplication_token": f"t{k}", "min_insert_block_size_rows": n,
                    "min_insert_block_size_bytes": 0})
                return "ok"
            except Exception as exc:  # the server's refusal, as the writer would see it
                text = str(exc)
                return text[text.find("Code:"):][:60] if "Code:" in text else type(exc).__name__

        filler = data / "filler"
        fill(filler, leave_bytes=a.leave_mb << 20)
        stop, fills = threading.Event(), [0]
        hog = threading.Thread(target=_hog, args=(data / "hog", stop, a.hold_s, a.gap_s, fills), daemon=True)
        hog.start()
        first = {k: send(k) for k in range(a.inserts)}
        stop.set()
        hog.join()
        (data / "hog").unlink(missing_ok=True)
        filler.unlink()
        todo = [k for k, r in first.items() if r != "ok"]
        deadline = time.monotonic() + a.retry_s
        while todo and time.monotonic() < deadline:
            todo = [k for k in todo if send(k) != "ok"]
            time.sleep(0.05)
        acked = [k for k in range(a.inserts) if k not in todo]

        def missing(client: Any) -> dict[str, int]:
            out = {"readings": 0, "readings_by_minute": 0}
            for k in acked:
                lo, hi = f"{BASE} + {k * span}", f"{BASE} + {(k + 1) * span}"
                r = int(client.command(f"SELECT count() FROM sensorhub.readings WHERE ts >= {lo} AND ts < {hi}"))
                m = int(client.command("SELECT countMerge(readings) FROM sensorhub.readings_by_minute "
                                       f"WHERE minute >= {lo} AND minute < {hi}"))
                out["readings"] += n - r
                out["readings_by_minute"] += n - m
            return out

        before_restart = missing(c)
        c.close()
        server.terminate(timeout=20)
        server = start_chdb_server(d, extra=VARIANTS[variant])
        c = clickhouse_connect.get_client(dsn=server.url, send_receive_timeout=120)
        after_restart = missing(c)
        log = (d / "chdb" / "chdb-server.log").read_text()
        c.close()
        return {
            "inserts": a.inserts, "rows_per_insert": n, "disk_fills": fills[0],
            "first_tries": dict(collections.Counter(first.values())),
            "acked_inserts": len(acked), "unacked_inserts": len(todo),
            "acked_rows_missing": before_restart, "acked_rows_missing_after_restart": after_restart,
            "broken_insert_parts_caught": log.count("of an INSERT was written broken"),
            "single_block_parts_set_aside": log.count("covers a single block"),
            "free_mb_at_end": free_bytes(data) >> 20,
        }
    finally:
        server.terminate(timeout=20)
        subprocess.run(["umount", "-l", str(data)], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs of each variant")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--disk-mb", type=int, default=256)
    p.add_argument("--leave-mb", type=int, default=20)
    p.add_argument("--inserts", type=int, default=200)
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--hold-s", type=float, default=0.02)
    p.add_argument("--gap-s", type=float, default=0.03)
    p.add_argument("--retry-s", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("disk_race.py mounts a tmpfs for each run: run it as root")
    if a.rows % 200:
        sys.exit("--rows: a multiple of 200 (the devices)")
    results = []
    for i in range(a.runs):
        for variant in a.variants:
            with tempfile.TemporaryDirectory(prefix="sensorhub-disk-race-") as d:
                started = time.monotonic()
                r = _run(Path(d), variant, a)
            r.update(variant=variant, run=i + 1, seconds=round(time.monotonic() - started, 1))
            print(json.dumps(r), flush=True)
            results.append(r)
    summary = {}
    for variant in a.variants:
        rs = [r for r in results if r["variant"] == variant]
        summary[variant] = {
            "runs": len(rs),
            "acked_rows": sum(r["acked_inserts"] * r["rows_per_insert"] for r in rs),
            "acked_rows_lost": sum(r["acked_rows_missing_after_restart"]["readings"] for r in rs),
            "acked_rollup_rows_lost": sum(r["acked_rows_missing_after_restart"]["readings_by_minute"] for r in rs),
            "runs_with_loss": sum(1 for r in rs if any(r["acked_rows_missing_after_restart"].values())),
            "broken_insert_parts_caught": sum(r["broken_insert_parts_caught"] for r in rs),
        }
    write_results(a.out, "disk_race", results, summary=summary, settings={
        k: getattr(a, k) for k in ("disk_mb", "leave_mb", "inserts", "rows", "hold_s", "gap_s", "retry_s")})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
