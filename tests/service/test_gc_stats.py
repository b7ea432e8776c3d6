"""The collector's pauses are measured and published; long-running processes freeze their start-up objects."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from sensorhub.metrics import gcstats


def test_pauses_are_counted_and_the_maximum_restarts() -> None:
    gcstats.install()
    gcstats.snapshot()
    for _ in range(3):
        a: list[Any] = []
        a.append(a)  # a cycle only the collector frees
        del a
        gc.collect()
    s = gcstats.snapshot()
    assert s["collections"] >= 3 and s["full_collections"] >= 3
    assert s["pause_max_ms"] > 0 and s["pause_total_ms"] >= s["pause_max_ms"]
    assert gcstats.snapshot()["pause_max_ms"] == 0  # a new interval


def test_ingest_and_writer_publish_frozen_start_up_objects(stack_factory) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory()
    r = stack.redis()
    deadline = time.monotonic() + 30
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline and len(seen) < 2:
        for key in r.scan_iter("sh:metrics:*"):
            raw = r.hget(key, "state")
            if raw:
                snap = json.loads(raw)
                if snap["role"] in ("ingest", "writer"):
                    seen[snap["role"]] = snap
        time.sleep(0.3)
    assert set(seen) == {"ingest", "writer"}, list(seen)
    for role, snap in seen.items():
        assert snap["gc"]["frozen_objects"] > 1000, (role, snap["gc"])
