"""Ground-truth files and the verifier against a real ClickHouse HTTP server (chdb-server).

The test writes a truth, stores its readings in a ``readings`` table with the
product's DDL, then removes, duplicates and alters some on purpose and checks
that verify counts exactly those.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_sim.truth import (
    FLAG_SKEWED,
    TruthWriter,
    merge_truth,
    read_summary,
    read_truth,
    value_checksum,
)
from firmware_sim.verify import verify

DDL = """
CREATE TABLE {db}.readings (
    device LowCardinality(String), metric LowCardinality(String), ts DateTime64(6, 'UTC'),
    value Float64, quality UInt8, seq UInt64, recv DateTime64(6, 'UTC'),
    source LowCardinality(String), inserted DateTime64(6, 'UTC') DEFAULT now64(6)
) ENGINE = ReplacingMergeTree ORDER BY (device, metric, ts, seq)
"""

DEVICES = ["dev-0001", "dev-0002", "line1/dev-0003"]
METRICS = ["m1", "m2", "temp_c"]
T0 = 1_764_072_000_000_000


def make_rows(n_msgs: int, seed: int = 3) -> list[tuple[int, int, int, int, float, int]]:
    """(device, metric, ts_us, seq, value, flags) rows as the simulator records them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_msgs):
        dev = i % 3
        ts = T0 + i * 1000
        for j in range(3):
            v = math.nan if rng.random() < 0.05 else rng.uniform(-100, 100)
            seq = -1 if dev == 2 else i * 65536 + j  # the third device's format carries no seq
            rows.append((dev, j, ts + j, seq, v, FLAG_SKEWED if (dev == 1 and i % 10 == 0) else 0))
    return rows


def write_truth(path: Path | None, rows: list[tuple[int, int, int, int, float, int]], **kw: Any) -> TruthWriter:
    tw = TruthWriter(path, DEVICES, METRICS, **kw)
    for dev, m, ts, seq, v, fl in rows:
        tw.add(dev, [0, 1, 2], [(m, ts, seq, v)], fl)
    return tw


def test_truth_file_round_trip_and_checksums(tmp_path: Path) -> None:
    rows = make_rows(30_000)  # more than one chunk
    tw = write_truth(tmp_path / "a.truth", rows)
    tw.dead_letter("dev-0001", "crc")
    tw.event("duplicates", 2)
    summary = tw.close()
    assert summary == read_summary(tmp_path / "a.truth")
    s, chunks = read_truth(tmp_path / "a.truth")
    got = [
        (int(d), int(m), int(t), int(q), float(v), int(f))
        for c in chunks
        for d, m, t, q, v, f in zip(c.device, c.metric, c.ts_us, c.seq, c.value, c.flags, strict=True)
    ]
    assert len(got) == len(rows) == s["published"]
    for a, b in zip(got, rows, strict=True):
        assert a[:4] == b[:4] and a[5] == b[5]
        assert (math.isnan(a[4]) and math.isnan(b[4])) or a[4] == b[4]
    for d in range(3):
        vals = np.array([r[4] for r in rows if r[0] == d])
        assert s["counts"][d] == len(vals)
        assert int(s["checksums"][d]) == value_checksum(vals)
    assert s["dead_letters"] == {"crc": 1} and s["events"] == {"duplicates": 2}
    assert s["ts_min_us"] == T0 and s["ts_max_us"] == rows[-1][2]


def test_truth_past_the_full_limit_keeps_counts_only(tmp_path: Path) -> None:
    rows = make_rows(100_000 // 3)
    summary = write_truth(tmp_path / "b.truth", rows, full_limit=1000).close()
    assert summary["full"] is False and summary["published"] == len(rows)
    _, chunks = read_truth(tmp_path / "b.truth")
    assert list(chunks) == []


def test_merge_truth_parts(tmp_path: Path) -> None:
    rows = make_rows(3000)
    a = write_truth(tmp_path / "p0", rows[: len(rows) // 2]).close()
    b = write_truth(tmp_path / "p1", rows[len(rows) // 2 :]).close()
    merged = merge_truth([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    assert merged["published"] == a["published"] + b["published"] == len(rows)
    whole = write_truth(None, rows).close()
    assert merged["counts"] == whole["counts"] and merged["checksums"] == whole["checksums"]
    _, chunks = read_truth(tmp_path / "m")
    assert sum(len(c.ts_us) for c in chunks) == len(rows)


def test_not_a_truth_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"hello world, this is not it")
    with pytest.raises(ValueError, match="truth file"):
        read_summary(p)


def _ts(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us // 1_000_000, dt.UTC) + dt.timedelta(microseconds=us % 1_000_000)


def _store(client: Any, rows: list[tuple[int, int, int, int, float, int]], latency_us: int) -> None:
    data = [
        [DEVICES[d], METRICS[m], _ts(ts), v, 0, max(seq, 0), _ts(ts), "mqtt", _ts(ts + latency_us)]
        for d, m, ts, seq, v, _f in rows
    ]
    client.insert(
        "readings", data,
        column_names=["device", "metric", "ts", "value", "quality", "seq", "recv", "source", "inserted"],
    )


@pytest.mark.parametrize("slice_rows", [4_000_000, 200], ids=["one-slice", "sliced"])
@pytest.mark.parametrize("full", [True, False])
def test_verify_counts_loss_duplicates_and_mismatches(
    ch_client: Any, ch_database: str, tmp_path: Path, full: bool, slice_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same figures whether the verification runs in one query or in slices of devices
    (a long run is verified in slices so that the server's memory stays bounded)."""
    import firmware_sim.verify as verify_mod

    monkeypatch.setattr(verify_mod, "SLICE_ROWS", slice_rows)
    ch_client.command(DDL.format(db=ch_database))
    # Merges would fold the duplicates this test stores on purpose.
    ch_client.command(f"SYSTEM STOP MERGES {ch_database}.readings")
    rows = make_rows(1000)
    truth = tmp_path / "v.truth"
    write_truth(truth, rows, full_limit=10**9 if full else 100).close()

    rng = random.Random(9)
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    # Loss on the first device, changed values on the second (so that the
    # counts-only check, which compares checksums of complete devices, sees them).
    lost = {i for i in idx if rows[i][0] == 0}
    lost = set(sorted(lost)[:37])
    changed = set([i for i in idx if rows[i][0] == 1][:11])
    dup = idx[100:100 + 23]
    stored = []
    for i, r in enumerate(rows):
        if i in lost:
            continue
        if i in changed:
            r = (*r[:4], (0.5 if math.isnan(r[4]) else r[4] + 1.0), r[5])
        stored.append(r)
    _store(ch_client, stored, latency_us=50_000)
    _store(ch_client, [rows[i] for i in dup if i not in lost], latency_us=80_000)
    n_dup = sum(1 for i in dup if i not in lost)

    result = verify(ch_client, truth, database=ch_database)
    assert result["published"] == len(rows)
    assert result["stored"] == len(rows) - len(lost) + n_dup
    assert result["lost"] == len(lost)
    assert result["duplicated"] == n_dup
    assert result["extra"] == 0
    if full:
        assert result["mismatched"] == len(changed)
        # Every reading's first copy was inserted 50 ms after its ts.
        assert result["p50_ms"] == pytest.approx(50.0)
        assert result["p99_ms"] == pytest.approx(50.0)
        assert result["max_ms"] == pytest.approx(50.0)
    else:
        assert result["mismatched"] is None and result["mismatched_devices"] == 1
        assert result["p50_ms"] is not None and result["max_ms"] >= 50.0


def test_verify_clean_run_is_clean(ch_client: Any, ch_database: str, tmp_path: Path) -> None:
    ch_client.command(DDL.format(db=ch_database))
    rows = make_rows(300)
    truth = tmp_path / "c.truth"
    tw = write_truth(truth, rows)
    tw.dead_letter("dev-0001", "bad magic")
    tw.close()
    _store(ch_client, rows, latency_us=10_000)
    r = verify(ch_client, truth, database=ch_database)
    assert (r["published"], r["stored"], r["lost"], r["duplicated"], r["mismatched"]) == (900, 900, 0, 0, 0)
    assert r["extra"] == 0
    # No dead_letters table in this database: reported as unknown, not as zero.
    assert r["dead_letters_expected"] == 1 and r["dead_letters_stored"] is None


def test_loadtest_json_names_and_loss_without_a_pipeline(
    mosquitto: Any, chdb_server: Any, ch_client: Any, ch_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing ingests here: loadtest waits (bounded), then reports every reading lost."""
    import json

    from firmware_sim.cli import main

    ch_client.command(DDL.format(db=ch_database))
    rc = main([
        "loadtest", "--mqtt", f"{mosquitto.host}:{mosquitto.port}", "--clickhouse", chdb_server.url,
        "--database", ch_database, "--rate", "400", "--duration", "0.5", "--devices", "8",
        "--format", "mixed", "--per-message", "2", "--qos", "1", "--drain-timeout", "3", "--settle", "1",
        "--json", "--client-prefix", "lt", "--device-prefix", "lt",
    ])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1
    for key in ("published", "stored", "lost", "duplicated", "mismatched", "p50_ms", "p95_ms", "p99_ms",
                "max_ms", "achieved_rate"):
        assert key in out
    assert out["published"] > 0 and out["lost"] == out["published"] and out["stored"] == 0
    assert out["p50_ms"] is None
