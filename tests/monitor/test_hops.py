"""One list of hop names: what the processes record is what the monitor, Prometheus and the tests know."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from sensorhub.metrics import hops
from sensorhub.metrics.hops import HOPS, PIPELINE_HOPS
from sensorhub.metrics.registry import Metrics
from sensorhub.monitor.state import ALL_HOPS, StateCollector
from tests.monitor.conftest import LAYOUT

PACKAGE = Path(hops.__file__).resolve().parents[1]


def _recorded_hops() -> dict[str, list[str]]:
    """Every hop name a ``record_us`` or ``record_since`` call in sensorhub/ passes, with where it is called."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("record_us", "record_since")):
                continue
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                name = arg.value
            elif isinstance(arg, ast.Attribute | ast.Name):
                attr = arg.attr if isinstance(arg, ast.Attribute) else arg.id
                assert hasattr(hops, attr), f"{where}: {attr} is not a constant of sensorhub.metrics.hops"
                name = getattr(hops, attr)
            else:
                raise AssertionError(f"{where}: the hop must be a string or a sensorhub.metrics.hops constant")
            found.setdefault(name, []).append(where)
    return found


def test_every_recorded_hop_is_listed_and_every_listed_hop_is_recorded() -> None:
    recorded = _recorded_hops()
    unlisted = {h: w for h, w in recorded.items() if h not in HOPS}
    assert not unlisted, f"recorded but not in sensorhub.metrics.hops.HOPS: {unlisted}"
    never = [h for h in HOPS if h not in recorded]
    assert not never, f"listed in HOPS but no process records them: {never}"
    # both processes record something: the scan did find the real call sites
    assert any("ingest.py" in w for ws in recorded.values() for w in ws)
    assert any("writer.py" in w for ws in recorded.values() for w in ws)


def test_the_monitor_and_the_verdict_use_the_list() -> None:
    assert ALL_HOPS == HOPS and len(set(HOPS)) == len(HOPS)
    assert PIPELINE_HOPS.issubset(HOPS) and len(PIPELINE_HOPS) < len(HOPS)
    assert {hops.RECV_TO_INSERT, hops.DEVICE_TO_INSERT}.isdisjoint(PIPELINE_HOPS)


def test_verdict_names_the_ingest_hop_when_it_is_the_slowest(redis_client: Any) -> None:
    ing = Metrics("ingest", "line-1")
    wr = Metrics("writer", "writer-1")
    wr.process += ":w"
    ing.record_us(hops.RECV_TO_XADD, 250_000, 20)  # 250 ms in ingest: batching or Redis is slow
    ing.record_us(hops.DECODE_TO_XADD, 2_000, 20)
    wr.record_us(hops.READ_TO_INSERT, 40_000, 20)
    wr.record_us(hops.INSERT, 30_000, 1)
    wr.record_us(hops.RECV_TO_INSERT, 300_000, 20)  # end to end: larger, but not a stage
    for m in (ing, wr):
        m.publish(redis_client, LAYOUT.metrics_key(m.process), 30)
    st = StateCollector(redis_client, LAYOUT).collect()
    assert set(st["latency"]) == {hops.RECV_TO_XADD, hops.DECODE_TO_XADD, hops.READ_TO_INSERT, hops.INSERT,
                                  hops.RECV_TO_INSERT}
    assert st["verdict"]["delay"].startswith("recv_to_xadd p99 25"), st["verdict"]


def test_record_since_counts_every_value_and_records_an_even_sample() -> None:
    m = Metrics("writer", "sampled")
    now = 10_000_000
    times = [now - (1000 + i) for i in range(3_300)]  # 1.000 ... 4.299 ms ago, µs
    m.record_since(hops.RECV_TO_XADD, now, times, most=64)
    m.record_since(hops.RECV_TO_XADD, now * 1000, [t * 1000 for t in times[:7]], per_us=1000)  # ns, fewer than most
    snap = m.snapshot()
    lat = snap["latency"][hops.RECV_TO_XADD]
    assert lat["count"] == 3_307  # exact counts, whatever the sample
    assert abs(lat["p50_ms"] - 2.65) < 0.06 and abs(lat["p99_ms"] - 4.27) < 0.06, lat
    h = snap["histograms"][hops.RECV_TO_XADD]
    assert h["count"] == 3_307
    _, _, interval = m.take_interval()
    assert interval[hops.RECV_TO_XADD]["count"] == 3_307
