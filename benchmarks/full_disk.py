"""A full data disk under the engine: how often a merge leaves a broken part, and what the
chdb-server's recovery (reopen the engine, sensorhub/chdb_server/engine.py) brings back.

Each cycle runs in a child process of its own, on a fresh tmpfs (``--disk-mb``) holding the
engine's data, with sensorhub's schema (``sensorhub.sinks.schema.ddl``):

1. INSERTs of 4,000 readings every 20 ms for ``--before-s`` (the writer's size at 40k/s), merges
   running;
2. another file fills the disk to the last byte, as a log or a copy would; INSERTs go on for
   ``--full-s`` (they are refused with NOT_ENOUGH_SPACE);
3. the file is removed and INSERTs go on for ``--after-s``;
4. every column of every part is read (``FINAL``, a hash of all columns). A broken part fails that
   read with CORRUPTED_DATA (246); the cycle then closes and reopens the engine, as the
   chdb-server does, and counts again.

A refused INSERT is repeated under its token until accepted, as the writer does. Per cycle:
the rows whose INSERT was accepted, the rows stored at the end, whether a part was broken, the
parts the reopening set aside, and the rows missing of each accepted INSERT after the recovery.
Rows stored can exceed the accepted ones: an INSERT refused because a rollup's part could not be
written has stored its readings already (its repetition is then deduplicated). Variants, cycles
alternating, the setting applied to every table:

- ``sensorhub``: the schema as shipped, replaced parts kept for ``old_parts_lifetime`` 480 s and
  INSERTs refused with less than 2 % of the disk free (``min_free_disk_ratio_to_perform_insert``);
- ``no-insert-floor``: the same without the 2 % floor;
- ``chdb-default``: neither (``old_parts_lifetime`` 0, chdb's own default: replaced parts
  deleted at the next cleanup).

Needs root (``mount``). Writes ``benchmarks/results/full-disk.json`` (``--out``). About 45 s a
cycle.

    .venv/bin/python benchmarks/full_disk.py [--cycles 5]
    .venv/bin/python benchmarks/full_disk.py --fs ext4 --variants sensorhub --cycles 3 \\
        --out benchmarks/results/full-disk-ext4.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kit.disk import fill  # noqa: E402
from kit.results import write_results  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "full-disk.json"
ROWS = 4000
VARIANTS = {
    "sensorhub": None,
    "no-insert-floor": "min_free_disk_ratio_to_perform_insert = 0",
    "chdb-default": "old_parts_lifetime = 0, min_free_disk_ratio_to_perform_insert = 0",
}


def _cycle(data: str, setting: str | None, before_s: float, full_s: float, after_s: float) -> dict[str, Any]:
    import chdb.session as cs

    from sensorhub.sinks.schema import ddl

    s = cs.Session(data)
    for st in ddl("sensorhub"):
        s.query(st)
    if setting:  # on every table, the rollups' too: an INSERT writes a part into each
        tables = s.query("SELECT name FROM system.tables WHERE database = 'sensorhub' AND engine LIKE '%MergeTree'",
                         "TSV").bytes().decode().split()
        for table in tables:
            s.query(f"ALTER TABLE sensorhub.`{table}` MODIFY SETTING {setting}")
    acked = refused = n = 0
    acked_inserts: set[int] = set()
    other_errors: list[str] = []

    def insert() -> None:
        """The next INSERT, repeated under its token until accepted, as the writer does."""
        nonlocal acked, refused, n
        n += 1
        while True:
            try:
                s.query(
                    "INSERT INTO sensorhub.readings (device, metric, ts, value, quality, seq, recv, source) "
                    f"SETTINGS insert_deduplication_token = 'c{n}' "
                    "SELECT concat('dev-', toString(number % 200)), concat('m', toString(number % 10)), "
                    f"now64(6) - toIntervalMicrosecond(number), number / 100, 0, {n} * 100000 + number, "
                    f"now64(6), 'mqtt' FROM numbers({ROWS})"
                )
                acked += ROWS
                acked_inserts.add(n)
                return
            except Exception as exc:
                refused += 1
                if "NOT_ENOUGH_SPACE" not in str(exc) and len(other_errors) < 3:
                    other_errors.append(str(exc)[:200])
                if time.monotonic() > stop_retrying:
                    return
                time.sleep(0.02)

    def run_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            insert()
            time.sleep(0.02)

    stop_retrying = time.monotonic() + before_s + full_s + after_s
    run_for(before_s)
    filler = Path(data) / "filler"
    fill(filler, to_the_last_byte=True)
    run_for(full_s)
    refused_full = refused
    filler.unlink()
    run_for(after_s)
    out: dict[str, Any] = {"acked_rows": acked, "refused_inserts_full": refused_full,
                           "refused_inserts": refused, "other_errors": other_errors, "broken": False}
    # every column of every part read (the hash), then the rows of each INSERT counted
    check = "SELECT count(), sum(cityHash64(*)) FROM sensorhub.readings FINAL"
    per_insert = "SELECT intDiv(seq, 100000), count() FROM sensorhub.readings FINAL GROUP BY 1"

    def count() -> None:
        out["stored_rows"] = int(s.query(check, "TSV").bytes().decode().split("\t")[0])
        have = dict(map(int, ln.split("\t")) for ln in s.query(per_insert, "TSV").bytes().decode().split("\n") if ln)
        short = {i: ROWS - have.get(i, 0) for i in acked_inserts if have.get(i, 0) < ROWS}
        out["lost_rows"] = sum(short.values())
        out["inserts_short"] = len(short)

    try:
        count()
    except Exception as exc:
        out["broken"] = True
        out["error"] = str(exc)[:300]
        s.close()
        s = cs.Session(data)
        try:
            out["detached"] = s.query("SELECT name FROM system.detached_parts", "TSV").bytes().decode().split()
            count()
        except Exception as exc2:
            out["error_after_reopen"] = str(exc2)[:300]
    s.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=4, help="cycles of each variant")
    p.add_argument("--disk-mb", type=int, default=64)
    p.add_argument("--fs", choices=("tmpfs", "ext4"), default="tmpfs",
                   help="the data disk: a tmpfs, or ext4 on a loop device (a file under /tmp)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--before-s", type=float, default=6.0)
    p.add_argument("--full-s", type=float, default=4.0)
    p.add_argument("--after-s", type=float, default=25.0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child", nargs=2, metavar=("DATA", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        data, variant = a.child
        print(json.dumps(_cycle(data, VARIANTS[variant], a.before_s, a.full_s, a.after_s)), flush=True)
        return
    if os.geteuid() != 0:
        sys.exit("full_disk.py mounts a tmpfs for each cycle: run it as root")
    results = []
    for i in range(a.cycles):
        for variant in a.variants:
            with tempfile.TemporaryDirectory(prefix="sensorhub-full-disk-") as d:
                if a.fs == "ext4":
                    image = Path(d + ".img")
                    subprocess.run(["truncate", "-s", f"{a.disk_mb}M", str(image)], check=True)
                    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
                    subprocess.run(["mount", "-o", "loop", str(image), d], check=True)
                else:
                    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.disk_mb}m", "tmpfs", d], check=True)
                try:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", d, variant, "--before-s", str(a.before_s),
                         "--full-s", str(a.full_s), "--after-s", str(a.after_s)],
                        capture_output=True, text=True, timeout=a.before_s + a.full_s + a.after_s + 120,
                    )
                finally:
                    subprocess.run(["umount", "-l", d], check=False)
                    if a.fs == "ext4":
                        image.unlink()
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-300:]}"}
            r.update(variant=variant, cycle=i + 1)
            print(json.dumps({k: r.get(k) for k in ("variant", "cycle", "acked_rows", "stored_rows", "broken", "lost_rows")}),
                  flush=True)
            results.append(r)
    summary = {}
    for variant in a.variants:
        rs = [r for r in results if r["variant"] == variant]
        summary[variant] = {
            "cycles": len(rs),
            "broken": sum(1 for r in rs if r.get("broken")),
            "cycles_with_loss": sum(1 for r in rs if r.get("lost_rows")),
            "lost_rows": sum(r.get("lost_rows") or 0 for r in rs),
            "acked_rows": sum(r.get("acked_rows") or 0 for r in rs),
        }
    write_results(a.out, "full_disk", results, summary=summary,
                  settings={"fs": a.fs, "disk_mb": a.disk_mb, "before_s": a.before_s, "full_s": a.full_s, "after_s": a.after_s,
                            "rows_per_insert": ROWS})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
