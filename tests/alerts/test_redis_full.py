"""The evaluator keeps acknowledging while Redis is full: else the writer could never trim below
the entries its group holds, and the memory would never come free."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis as redis_mod
from kit.streams import readings_entry

from sensorhub.decoders import ReadingBatch
from sensorhub.pipeline.keys import StreamLayout


def _entry(k: int) -> dict[bytes, bytes]:
    b = ReadingBatch(64)
    now = int(time.time() * 1e6)
    for i in range(50):
        b.append(f"dev-{k % 20}", f"m{i % 8}", now + i, 20.0 + i, 0, k, now + i)
    return readings_entry(b)


def test_the_evaluator_acknowledges_with_redis_full(spawn: Any, tmp_path: Path, wait_for: Any) -> None:
    rs = spawn.redis(maxmemory="4mb")
    r = redis_mod.Redis.from_url(rs.url)
    cfg = tmp_path / "sensorhub.toml"
    cfg.write_text('[[alerts.rules]]\nname = "hot"\nmetric = "m*"\nabove = 1e300\n'
                   '[[alerts.rules]]\nname = "rising"\nmetric = "m*"\nrate_above = 1e300\n')
    env = {**os.environ, "SENSORHUB_REDIS_URL": rs.url, "SENSORHUB_REDIS_PARTITIONS": "1"}
    log = (tmp_path / "evaluator.log").open("wb")
    ev = subprocess.Popen([sys.executable, "-m", "sensorhub", "--config", str(cfg), "alerts", "evaluate", "--no-store"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        stream = StreamLayout(partitions=1).readings(0)
        wait_for(lambda: any(g["name"] == b"alerts" for g in _groups(r, stream)), what="the evaluator's group")
        # fill Redis until it refuses (noeviction): nothing else reads or trims this stream
        added = 0
        refused = False
        while added < 100_000:
            try:
                r.xadd(stream, _entry(added))
                added += 1
            except redis_mod.OutOfMemoryError:
                refused = True
                break
        assert refused and added > 10
        # every entry evaluated and acknowledged all the same (its checkpoint is allow-oom)
        wait_for(lambda: (g := _alerts_group(r, stream)) is not None and g["pending"] == 0 and g["lag"] == 0,
                 what="the entries acknowledged", timeout=60)
        assert r.xlen(stream) == added
        assert ev.poll() is None
    finally:
        ev.terminate()
        ev.wait(30)
        log.close()
        r.close()


def _groups(r: Any, stream: str) -> list[dict[str, Any]]:
    try:
        return list(r.xinfo_groups(stream))
    except redis_mod.ResponseError:
        return []


def _alerts_group(r: Any, stream: str) -> dict[str, Any] | None:
    return next((g for g in _groups(r, stream) if g["name"] == b"alerts"), None)
