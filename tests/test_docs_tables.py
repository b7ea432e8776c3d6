"""The benchmark tables in the docs are what benchmarks/docs_tables.py renders from the committed results.

Nothing here runs a benchmark: the docs are rendered in memory from the
result files in the repository, and each renderer is fed a result of the
shape its benchmark writes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "benchmarks" / "docs_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


dt = _generator()


@pytest.mark.parametrize("doc", dt.DOCS)
def test_every_generated_section_is_up_to_date_with_the_committed_results(doc: str) -> None:
    text = (ROOT / doc).read_text()
    assert dt.sections(text), f"{doc} has no generated sections"
    assert dt.render(text, ROOT) == text, f"{doc} differs from benchmarks/results/: run `make bench-docs`"


def test_every_section_names_a_renderer_and_a_result_git_keeps() -> None:
    git = shutil.which("git")
    for doc in dt.DOCS:
        for name, source in dt.sections((ROOT / doc).read_text()):
            assert name in dt.RENDERERS, (doc, name)
            assert source.startswith("benchmarks/results/"), (doc, source)
            if git is None or not (ROOT / ".git").exists():
                continue
            probe = source if source.endswith(".json") else f"{source}/scenario.json"
            ignored = subprocess.run([git, "check-ignore", "-q", probe], cwd=ROOT, check=False).returncode == 0
            assert not ignored, f"{probe} is ignored by .gitignore, so {doc} could never be checked against it"


# ---------------------------------------------------------------- a section, with and without its result


DOC = """# Numbers

<!-- bench:sparkplug-host benchmarks/results/sparkplug_host.json -->
4.88 M readings/s (Cython), 0.25 M (twin).
<!-- /bench -->

after
"""

SPARKPLUG_HOST = {
    "benchmark": "sparkplug_host",
    "case": "DDATA x10 by alias",
    "cpu": 1,
    "results": [
        {"impl": "cython", "messages_per_s": 488_123.4, "readings_per_s": 4_881_234.0},
        {"impl": "python", "messages_per_s": 25_011.0, "readings_per_s": 250_110.0},
    ],
}


def test_a_section_without_its_result_keeps_its_text_and_says_so(tmp_path: Path) -> None:
    out = dt.render(DOC, tmp_path)
    note = "*Not reproduced from a committed result: `benchmarks/results/sparkplug_host.json` is not in the repository.*"
    assert out == DOC.replace("json -->\n4.88", f"json -->\n{note}\n\n4.88").replace("twin).\n", "twin).\n\n")
    assert dt.render(out, tmp_path) == out  # rendering again changes nothing


def test_a_section_with_its_result_is_the_rendered_table_naming_the_file(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "sparkplug_host.json").write_text(json.dumps(SPARKPLUG_HOST))
    out = dt.render(dt.render(DOC, tmp_path), tmp_path)  # from hand-written text or from its marked form
    assert "4.88 M readings/s (Cython)" not in out
    assert (
        "*Rendered by `make bench-docs` from "
        "[`benchmarks/results/sparkplug_host.json`](../benchmarks/results/sparkplug_host.json).*"
    ) in out
    assert "| cython | 488 k | 4.88 M |" in out
    assert "| python | 25.0 k | 250 k |" in out
    assert out.endswith("<!-- /bench -->\n\nafter\n")
    assert dt.render(out, tmp_path) == out
    (results / "sparkplug_host.json").unlink()
    kept = dt.render(out, tmp_path)  # the result is gone: the rows stay, under the other note
    assert "Not reproduced from a committed result" in kept and "| cython | 488 k | 4.88 M |" in kept
    assert "Rendered by" not in kept


def test_a_section_naming_no_renderer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no renderer 'nonesuch'"):
        dt.render("<!-- bench:nonesuch benchmarks/results/x.json -->\n<!-- /bench -->\n", tmp_path)


def test_figures_are_written_as_the_docs_write_them() -> None:
    assert [dt.rate(v) for v in (7.0e6, 40.3e6, 590_400, 1_204_000, 72_000, 87.04, None)] == [
        "7.00 M", "40.3 M", "590 k", "1.20 M", "72.0 k", "87.0", "–",
    ]
    assert [dt.ms(v) for v in (0.71, 5.83, 25.4, 206.0, 22_512.0, None)] == [
        "0.7 ms", "5.8 ms", "25.4 ms", "206 ms", "22.5 s", "–",
    ]


# ---------------------------------------------------------------- every renderer, on the shape its benchmark writes


def _pipeline_case(case: str, client: str, achieved: float, **kw: Any) -> dict[str, Any]:
    rate, _, per = case.partition("x")
    hop = {"count": 100, "p50_ms": 5.8, "p95_ms": 9.0, "p99_ms": 11.9, "max_ms": 20.0}
    return {
        "case": case, "mqtt_client": client, "target_rate": int(rate), "per_message": int(per),
        "published": 799_930, "stored": 799_930, "lost": 0, "duplicated": 0, "mismatched": 0,
        "achieved_rate": achieved, "p50_ms": 34.1, "p95_ms": 58.0, "p99_ms": 66.2, "max_ms": 207.0,
        "cpu_cores": {"mosquitto": 0.06, "redis": 0.02, "chdb-server": 0.58, "ingest": 0.13, "writer": 0.24},
        "hops": {"ingest:recv_to_xadd": hop, "writer:insert": {**hop, "p50_ms": 20.1, "p99_ms": 31.0}},
        "ingest_cpu_us_per_msg": 9.2, "zero_loss": True, **kw,
    }


PIPELINE = {
    "machine": {"cpus": 2, "load_before": [0.5, 0.4, 0.3]},
    "results": [_pipeline_case("40000x10", "native", 39_998.0), _pipeline_case("80000x1", "native", 42_310.0)],
}


def test_pipeline_tables() -> None:
    rows = dt.pipeline(PIPELINE)
    assert "| 40k × 10 | native | 799,930 | 0 | 0 | 34.1 ms | 58.0 ms | 66.2 ms | 207 ms | 0.06 / 0.58 / 0.13 / 0.24 |" in rows
    assert any(r.startswith("| 80k × 1 (offered 42.3 k/s) |") for r in rows)
    hops = dt.pipeline_hops(PIPELINE)
    assert hops[0] == "Case `40000x10`, MQTT client `native`:"
    assert "| MQTT receive → in Redis (ingest) (`ingest:recv_to_xadd`) | 5.8 ms | 11.9 ms |" in hops
    assert "| one INSERT (per INSERT, not per reading) (`writer:insert`) | 20.1 ms | 31.0 ms |" in hops
    drivers = dt.pipeline_drivers({"results": [_pipeline_case("40000x1", "paho", 38_712.0, p50_ms=22_512.0)]})
    assert "| 40000x1 paho | 799,930 | 38.7k/s | 0 / 0 | 22.5 s | 66.2 ms | 9.2 µs |" in drivers


def _decoder(case: str, impl: str, fmt: str, per: int, payloads_per_s: float) -> dict[str, Any]:
    return {"case": case, "format": fmt, "impl": impl, "readings_per_payload": per,
            "payloads_per_s": payloads_per_s, "readings_per_s": payloads_per_s * per}


DECODERS = {
    "benchmark": "decoders", "unit": "best round, one pinned core", "rounds": 5, "round_s": 0.2, "cpu": 1,
    "elapsed_s": 26.7,
    "results": [
        _decoder("frame f64 x1", "cython", "frame", 1, 7.0e6),
        _decoder("frame f64 x1", "python", "frame", 1, 0.32e6),
        _decoder("json shape1 x1", "cython", "json", 1, 4.19e6),
        _decoder("json shape1 x1", "reference msgspec.json.decode", "json", 1, 3.9e6),
        _decoder("json shape2 x10", "reference msgspec.json.decode", "json", 10, 1.53e6),
    ],
}


def test_decoder_tables() -> None:
    rows = dt.decoders(DECODERS)
    assert rows[0] == "Best of 5 rounds of 0.2 s on one pinned core; the run took 26.7 s."
    assert "| frame f64 x1 | 7.00 M (7.00 M frames/s) | 320 k (320 k frames/s) | ≥ 1 M frames/s |" in rows
    assert "| json shape1 x1 | 4.19 M | – | ≥ 1.5 M |" in rows
    assert not any("msgspec" in r for r in rows)
    parsers = dt.decoder_parsers(DECODERS)
    assert parsers[0] == "| parser (readings/s) | json shape1 x1 | json shape2 x10 |"
    assert "| msgspec.json.decode | 3.90 M | 15.3 M |" in parsers


def test_sparkplug_host_and_chdb_server_tables() -> None:
    assert dt.sparkplug_host(SPARKPLUG_HOST)[0] == "Case: DDATA x10 by alias."
    chdb = dt.chdb_server({
        "benchmark": "chdb_server insert throughput", "unit": "rows/s", "rows_per_batch": 10_000,
        "batches_per_run": 10, "runs": [{"run": 1}, {"run": 2}, {"run": 3}],
        "median": {"client_insert": 590_412, "direct_file": 1_263_000},
        "machine": {"cpus": 2, "loadavg_1m": 0.8}, "when": "2026-11-30T10:00:00+00:00",
    })
    assert chdb[0].startswith("10 batches of 10,000 rows per run, 3 runs, medians; load 0.8")
    assert "| clickhouse-connect `insert` of Python columns, through the server | 590 k |" in chdb
    assert "| chdb in-process, `file()` table function | 1.26 M |" in chdb


SIMULATOR = {
    "benchmark": "simulator",
    "machine": {"cpus": 2, "python": "3.11.7", "load_avg_1m_at_end": 1.2},
    "seconds_per_case": 3.0,
    "results": [
        {"case": "max pooled qos1 x1", "args": "--rate 2000000", "messages_per_s": 105_700, "readings_per_s": 105_700,
         "sim_cpu_s_per_1k_messages": 0.0083, "sim_cpu_cores": 0.88, "broker_cpu_s_per_1k_messages": 0.0058,
         "unacked": 0, "wall_s": 4.1},
        {"case": "operating point 20k messages/s, x1, qos1, pooled", "args": "--rate 20000",
         "messages_per_s": 20_000, "readings_per_s": 19_990, "sim_cpu_s_per_1k_messages": 0.0143,
         "sim_cpu_cores": 0.29, "broker_cpu_s_per_1k_messages": 0.0072, "unacked": 0, "wall_s": 4.0,
         "target_readings_per_s": 20_000.0, "rate_error_pct": -0.05},
        {"case": "max per-device qos0 x10", "error": "cannot connect"},
        {"case": "rate held 5000 readings/s, 200 devices, 10 s", "target_readings": 50_000, "published": 49_990,
         "rate_error_pct": -0.02, "per_second": [4000, 5000, 5010], "per_second_error_pct_max": 0.2, "unacked": 0},
        {"case": "client firmware_sim: 50000 QoS 1 messages, window 64", "client": "firmware_sim", "messages": 50_000,
         "acked": 50_000, "complete": True, "elapsed_s": 0.9, "cpu_s": 0.41, "messages_per_s": 55_555,
         "cpu_us_per_message": 8.2, "broker_cpu_s_per_1k_messages": 0.0061},
        {"case": "client aiomqtt: 50000 QoS 1 messages, window 64", "client": "aiomqtt", "messages": 50_000,
         "acked": 41_000, "complete": False, "elapsed_s": 30.0, "cpu_s": 29.1, "messages_per_s": 1367,
         "cpu_us_per_message": 709.76, "broker_cpu_s_per_1k_messages": 0.0064},
    ],
}


def test_simulator_tables() -> None:
    rows = dt.simulator(SIMULATOR)
    assert rows[0] == "3 s per case; load 1.2 at the end."
    assert "| max pooled qos1 x1 | 106 k | 106 k | 8.3 ms (0.88 core) | 5.8 ms |  |" in rows
    assert "| operating point 20k messages/s, x1, qos1, pooled | 20.0 k | 20.0 k | 14.3 ms (0.29 core) | 7.2 ms | -0.05 % |" in rows
    assert "| max per-device qos0 x10 | failed |  |  |  |  |" in rows
    assert not any("rate held" in r or "client " in r for r in rows)
    held = dt.simulator_rate(SIMULATOR)
    assert held[2:] == ["| rate held 5000 readings/s, 200 devices, 10 s | 50,000 | 49,990 | -0.02 % | 0.20 % |"]
    clients = dt.simulator_clients(SIMULATOR)
    assert clients[2:] == [
        "| firmware_sim | 50,000 | 50,000 | 55.6 k | 8.2 µs | 6.1 ms | yes |",
        "| aiomqtt | 50,000 | 41,000 | 1.37 k | 709.8 µs | 6.4 ms | no (time bound) |",
    ]


def test_exchanges_table() -> None:
    rows = dt.exchanges({
        "benchmark": "exchanges", "python": "3.11.7",
        "venues": {"okx": {"parse": {"frames": 100, "trades_per_pass": 20, "frames_per_s": 1_090_000,
                                     "trades_per_s": 200_000, "bytes_per_frame": 412},
                           "feed": {"frames": 100, "trades": 20, "seconds": 0.1, "peak_rss_mb": 38.71}}},
        "summary": {"mean_frames_per_s": 876_000, "max_peak_rss_mb": 48.9},
    })
    assert "| okx | 1.09 M | 200 k | 412 B | 38.7 MB |" in rows
    assert rows[-1] == "Mean 876 k frames/s per core; largest feed process 48.9 MB."


def _fault(published: int, notes: dict[str, Any]) -> dict[str, Any]:
    return {
        "published": published, "stored": published, "distinct": published, "duplicated": 0, "lost": 0,
        "mismatched": 0, "p50_ms": 32.8, "p95_ms": 99.3, "p99_ms": 965.1, "max_ms": 1200.0,
        "publisher": {"published": published, "achieved_rate": 4998.2, "unacked_messages": 0, "reconnects": 0},
        "audit_ok": True,
        "peak_rss_mb": {"mosquitto": 8.4, "redis": 14.3, "chdb-server": 475.7, "ingest": 60.8, "writer": 178.5},
        "notes": notes,
    }


def test_faults_table_in_the_scenarios_order(tmp_path: Path) -> None:
    for name, doc in {
        "redis_kill": _fault(74_990, {"redis_back_s": 0.81}),
        "ingest_kill": _fault(74_970, {"ingest_back_s": 1.11, "store_wait_s": 0.01}),
        "clickhouse_outage": _fault(74_990, {"outage_s": 7.5, "backlog_entries_at_recovery": 3099, "drain_s": 1.81,
                                             "drain_rows_per_s": 25_718, "live_rows_per_s": 5000.0}),
        "a_new_scenario": _fault(10, {}),
        "slow_clickhouse": _fault(74_990, {}),  # stopped before it noted its alerts
    }.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    rows = dt.faults(dt.load(tmp_path))
    assert [r.split(" | ")[0] for r in rows[2:]] == [
        "| ingest kill -9, twice", "| ClickHouse stopped, then killed; restarted",
        "| Redis kill -9, restarted from its AOF", "| slow ClickHouse (stopped 4 s of every 4.5 s)",
        "| a_new_scenario",
    ]
    assert rows[2] == "| ingest kill -9, twice | 74,970 | 0 | 0 | back READY in 1.1 s | 5.0k/s | 965 ms | 61 / 178 / 476 MB |"
    assert "outage 7.5 s; drained 3,099 entries in 1.8 s, 25.7 k rows/s (5.1× live)" in rows[3]
    assert "|  | 5.0k/s |" in rows[5]


def _storage_candidate(bytes_per_row: float, **columns: float) -> dict[str, Any]:
    return {
        "rows": 1000, "bytes_per_row": bytes_per_row, "columns": columns, "other": 0.01,
        "parts_before_merge": 10, "parts_after_merge": 1, "insert_cpu_s": 0.5, "insert_cpu_ms_per_insert": 14.04,
        "insert_wall_s": 0.6, "merge_cpu_s": 4.96, "merge_wall_s": 5.0, "codecs": {}, "order_by": "(device)",
    }


STORAGE = {
    "benchmark": "storage: bytes per row after merges by column codec", "engine": "chdb (ClickHouse 26.9.2.1)",
    "readings_per_signal": 2_500_000, "trades_rows": 300_000, "rows_per_insert": 4000, "elapsed_s": 422.7,
    "readings": {"walk": {"generated_s": 10.8, "candidates": {"delta_delta_zstd1": _storage_candidate(
        2.884, value=0.652, ts=0.802, seq=0.239, recv=0.844, inserted=0.306, device=0.002, metric=0.004,
        source=0.001, quality=0.024)}}},
    "trades": {"candidates": {"zstd3": _storage_candidate(
        8.19, trade_id=0.63, price=0.77, amount=1.69, ts=1.94, recv=2.5, inserted=0.4, venue=0.1, symbol=0.1,
        side=0.05)}},
}


def test_storage_tables() -> None:
    rows = dt.storage(STORAGE)
    assert rows[0] == ("2,500,000 readings per signal, INSERTs of 4,000 rows, chdb (ClickHouse 26.9.2.1); "
                       "the run took 422.7 s.")
    assert rows[4] == "| walk | `delta_delta_zstd1` | **2.88** | 0.65 | 0.80 | 0.24 | 0.84 | 0.31 | 0.04 | 14.0 | 5.0 |"
    trades = dt.storage_trades(STORAGE)
    assert trades[0] == "300,000 synthetic trades, INSERTs of 4,000 rows."
    assert trades[4] == "| `zstd3` | **8.19** | 0.63 | 0.77 | 1.69 | 1.94 | 2.50 | 0.40 | 0.26 | 14.0 | 4.96 |"


def test_storage_schema_table_takes_each_column_from_a_candidate_with_the_schemas_codec() -> None:
    from sensorhub.sinks.schema import READINGS, TRADES

    def spelled(codec: str | None) -> str:  # as the benchmark writes them: Delta, not Delta(8)
        return (codec or "LZ4 (default)").replace("Delta(8)", "Delta")

    def candidate(table: Any, bytes_each: float, **codecs: str) -> dict[str, Any]:
        c = _storage_candidate(0.0, **{col: bytes_each for col, _ in table.columns})
        c["codecs"] = {col: codecs.get(col, spelled(table.codec(col))) for col, _ in table.columns}
        c["order_by"] = table.order_by
        return c

    doc = {
        "readings": {
            "walk": {"candidates": {"mixed": candidate(READINGS, 0.1), "lz4": candidate(READINGS, 9.0, seq="LZ4")}},
            "random": {"candidates": {"no_seq": candidate(READINGS, 0.5, seq="T64, ZSTD(1)")}},
        },
        "trades": {"candidates": {"same": candidate(TRADES, 0.2)}},
    }
    rows = dt.storage_schema(doc)
    assert "| `seq` | DoubleDelta, ZSTD(1) | 0.10 | 0.10* | `mixed` |" in rows
    assert "| `value` | Delta(8), ZSTD(1) | 0.10 | 0.50 | `mixed` |" in rows
    assert f"| **all columns** |  | **{0.1 * 9 + 0.01:.2f}** | **{0.5 * 8 + 0.1 + 0.01:.2f}** |  |" in rows
    assert "\\* measured on the other signal's rows: the column is the same in both." in rows
    assert f"| **all columns** |  | **{0.2 * 9 + 0.01:.2f}** |  |" in rows


def _soak_run(config: str, after_up: list[str], p99s: list[float]) -> dict[str, Any]:
    return {
        "rate": 40_000, "per_message": 10, "seconds": 600.0, "config": config, "after_up": after_up,
        "result": {"stored": 23_999_820, "lost": 0, "duplicated": 0, "p50_ms": 34.7, "p95_ms": 61.8,
                   "p99_ms": 105.0, "max_ms": 236.0},
        "per_minute": [{"minute": f"12:{i:02d}", "readings": 2_400_000, "p99_ms": v} for i, v in enumerate(p99s)],
        "cpu_cores_mean": {"chdb-server": 0.74, "writer": 0.25, "ingest": 0.14},
        "reference_before": {"ref_python_s": 0.127, "ref_chdb": {"p99_ms": 8.64}},
        "reference_after": {"ref_python_s": 0.13, "ref_chdb": {"p99_ms": 7.8}},
    }


def test_soak_table_one_row_a_run_from_a_glob(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    # the first and last minutes are partly outside the load: not the worst minute even when higher
    (results / "soak-40k-a.json").write_text(json.dumps(_soak_run("", [], [900.0, 63.0, 113.0, 800.0])))
    (results / "soak-40k-b.json").write_text(json.dumps(
        {**_soak_run('[writer]\noverlap = false\nmin_batch_ms = 50\n', ["DROP VIEW v"], [1.0, 2.0, 3.0]),
         "commit": "9882f2b"}))
    (results / "soak-20k-c.json").write_text(json.dumps(_soak_run("", [], [1.0])))  # not matched
    doc = "<!-- bench:soak benchmarks/results/soak-40k-*.json -->\n<!-- /bench -->\n"
    out = dt.render(doc, tmp_path)
    assert "[`benchmarks/results/soak-40k-*.json`](../benchmarks/results)" in out
    rows = [x for x in out.splitlines() if x.startswith("| `soak")]
    assert rows == [
        "| `soak-40k-a.json` | as shipped | 40k × 10, 10 min | 23,999,820 | 0 / 0 | 34.7 ms | 61.8 ms | 105 ms "
        "| 236 ms | 113 ms | 0.74 / 0.25 / 0.14 | 0.127 s; 8.6 ms / 7.8 ms |",
        "| `soak-40k-b.json` (9882f2b) | `writer.overlap = false`; `writer.min_batch_ms = 50`; `DROP VIEW v` | 40k × 10, 10 min "
        "| 23,999,820 | 0 / 0 | 34.7 ms | 61.8 ms | 105 ms | 236 ms | 2.0 ms | 0.74 / 0.25 / 0.14 | 0.127 s; 8.6 ms / 7.8 ms |",
    ]
    assert dt.render(out, tmp_path) == out


def test_drain_table_a_row_a_writer_variant_with_each_runs_ratio() -> None:
    def run(variant: str, drain: int, resumed: float) -> dict[str, Any]:
        return {"variant": variant, "notes": {"drain_rows_per_s": drain, "writer_resumed_s": resumed}}

    doc = {
        "commit": "abc1234", "settings": {"rate": 40000, "seconds": 60, "ref_seconds": 10.0},
        "results": [run("as shipped", 260_000, 0.3), run("wait-for-insert", 190_000, 4.1),
                    run("as shipped", 240_000, 0.1), run("wait-for-insert", 150_000, 7.9)],
        "summary": {
            "as shipped": {"runs": 2, "passed": 2, "lost": 0, "duplicated": 0, "median_drain_rows_per_s": 250_000,
                           "median_drain_x_live": 6.25, "median_writer_resumed_s": 0.2, "max_writer_resumed_s": 0.3,
                           "median_drain_from_resume_x_live": 6.5, "median_backlog_entries": 24_310.5,
                           "median_ref_python_s": 0.1611},
            "wait-for-insert": {"runs": 2, "passed": 1, "lost": 0, "duplicated": 3, "median_drain_rows_per_s": 170_000,
                                "median_drain_x_live": 4.25, "median_writer_resumed_s": 6.0,
                                "max_writer_resumed_s": 7.9, "median_drain_from_resume_x_live": 5.0,
                                "median_backlog_entries": 24_000, "median_ref_python_s": 0.17},
        },
    }
    rows = dt.drain(doc)
    assert rows[2] == ("| as shipped (reads the next batch while behind; backoff cap 1 s) | 2 of 2 | 0 / 0 | 24,310 "
                       "| 0.20 s / 0.30 s | 250 k (6.2×; runs 6.5×, 6.0×) | 6.5× | 0.161 s |")
    assert rows[3].startswith("| waits for each INSERT; backoff cap 10 s | 1 of 2 | 0 / 3 | 24,000 | 6.00 s / 7.90 s "
                              "| 170 k (4.2×; runs 4.8×, 3.8×) |")
    assert "Medians of 2 runs a variant" in rows[-1] and "commit abc1234" in rows[-1]
