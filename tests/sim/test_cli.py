"""The package's public surface and the command line's multi-process mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import firmware_sim
from firmware_sim.cli import build_parser, main
from firmware_sim.truth import read_truth


def test_exports_are_what_the_package_documents() -> None:
    assert sorted(firmware_sim.__all__) == sorted(
        ["FORMATS", "Device", "FaultConfig", "Message", "MqttConnection", "MqttError", "RunStats",
         "SimConfig", "Simulator", "TruthWriter", "Will", "make_devices", "parse_mix", "read_summary",
         "read_truth"]
    )
    for name in firmware_sim.__all__:
        assert getattr(firmware_sim, name) is not None
    doc = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text()
    for cmd in ("run", "verify", "loadtest"):
        assert f"sensorhub-sim {cmd}" in doc
        build_parser().parse_args([cmd, "--clickhouse", "http://x:1", "--truth", "t"] if cmd == "verify"
                                  else [cmd, "--clickhouse", "http://x:1"] if cmd == "loadtest" else [cmd])


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--mqtt", "nohost"],
        ["run", "--mqtt", "127.0.0.1:1", "--format", "frame=1,csv=2"],
        ["run", "--mqtt", "127.0.0.1:1", "--fault", "gremlins"],
        ["run", "--mqtt", "127.0.0.1:1", "--dictionary", "[1, 2]"],
        ["run", "--mqtt", "127.0.0.1:1", "--duration", "0.1"],  # nothing listens there
    ],
)
def test_bad_arguments_are_clear_errors(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = main([*argv, "--truth", str(tmp_path / "t.truth")])
    except SystemExit as exc:  # argparse rejects it
        rc = int(exc.code or 0)
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_procs_split_devices_and_merge_the_truth(mosquitto: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    truth = tmp_path / "procs.truth"
    rc = main(["run", "--mqtt", f"{mosquitto.host}:{mosquitto.port}", "--devices", "10", "--rate", "1000",
               "--duration", "0.5", "--format", "mixed", "--procs", "2", "--truth", str(truth), "--json",
               "--client-prefix", "procs", "--device-prefix", "procs"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["procs"] == 2 and out["devices"] == 10
    summary, chunks = read_truth(truth)
    assert summary["published"] == out["published"] == sum(len(c.ts_us) for c in chunks)
    assert all(c > 0 for c in summary["counts"])  # both halves of the devices published
