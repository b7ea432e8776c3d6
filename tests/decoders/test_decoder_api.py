"""The decoder API (``sensorhub.decoders``), ``sensorhub decode`` and the twin switch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kit.encoders import Frame, Reading

import sensorhub.decoders as decoders
from sensorhub import errors

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SENSORHUB_")}
    e["PYTHONPATH"] = str(ROOT)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sensorhub", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=e,
        timeout=60,
    )


def test_exports_are_what_the_docs_say() -> None:
    assert set(decoders.__all__) == {
        "FORMATS",
        "Decoder",
        "ReadingBatch",
        "decode_to_rows",
        "make_decoder",
    }
    assert dict(decoders.FORMATS) == {
        "frame": "frame",
        "json": "jsonpayload",
        "ilp": "lineproto",
        "sparkplug": "sparkplug",
    }
    for name in decoders.__all__:
        assert getattr(decoders, name) is not None


def test_make_decoder_unknown_format() -> None:
    with pytest.raises(errors.UnknownFormat) as ei:
        decoders.make_decoder("csv")
    assert "csv" in str(ei.value)


def test_make_decoder_uses_the_selected_implementation() -> None:
    import sensorhub

    d = decoders.make_decoder("frame")
    want = (
        "sensorhub._ext.frame"
        if sensorhub.IMPLEMENTATION == "cython"
        else "sensorhub.decoders.frame_py"
    )
    assert type(d).__module__ == want
    b = decoders.ReadingBatch(8)
    assert d.decode(None, Frame(readings=[Reading(3, 0, 0, 1.0)]).encode(), 5_000, b) == 1
    assert b.column("recv_us") == [5]


def test_decode_to_rows() -> None:
    f = Frame(
        device=b"press-7", frame_seq=1, readings=[Reading(1, 2, 1, 0.5), Reading(9, 3, 0, 2.0)]
    )
    rows = decoders.decode_to_rows("frame", f.encode(), dictionary={1: "temp_c"})
    assert rows == f.expected_rows({1: "temp_c"})
    assert list(rows[0]) == ["device", "metric", "ts_us", "value", "quality", "seq"]
    rows = decoders.decode_to_rows("json", b'{"metric": "a", "value": 2, "ts": 1.5}', device="d")
    assert rows == [
        {"device": "d", "metric": "a", "ts_us": 1_500_000, "value": 2.0, "quality": 0, "seq": 0}
    ]
    with pytest.raises(errors.DeviceMismatch):
        decoders.decode_to_rows("frame", f.encode(), device="other")


def test_cli_decode_frame_file_with_dictionary(tmp_path: Path) -> None:
    f = Frame(
        device=b"d1",
        readings=[Reading(1, 0, 0, 21.5), Reading(2, 1, 2, math.nan), Reading(2, 2, 0, -math.inf)],
    )
    (tmp_path / "f.bin").write_bytes(f.encode())
    (tmp_path / "c.toml").write_text('[dictionary]\n1 = "temp_c"\n')
    r = run_cli(
        "--config", str(tmp_path / "c.toml"), "decode", "--format", "frame", str(tmp_path / "f.bin")
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [(x["metric"], x["value"]) for x in lines] == [
        ("temp_c", 21.5),
        ("m2", "nan"),
        ("m2", "-inf"),
    ]
    assert lines[0] == {
        "device": "d1",
        "metric": "temp_c",
        "ts_us": f.base_ts,
        "value": 21.5,
        "quality": 0,
        "seq": 0,
    }


def test_cli_decode_json_stdin_and_invalid_input() -> None:
    r = run_cli(
        "decode",
        "--format",
        "json",
        "--device",
        "d",
        stdin=b'{"values": {"a": 1, "b": false}, "ts": 2}',
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["metric"] for x in r.stdout.decode().splitlines()] == ["a", "b"]
    r = run_cli(
        "decode", "--format", "json", "--device", "d", "-", stdin=b'{"metric": "a", "value": null}'
    )
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode().startswith("InvalidValue: invalid value")
    r = run_cli("decode", "--format", "frame", stdin=b"SH\x01\x00")
    assert r.returncode == 2 and b"Truncated: truncated" in r.stderr and b"offset 4" in r.stderr


def test_pure_python_switch() -> None:
    code = (
        "import sensorhub, sensorhub.decoders as d;"
        "print(sensorhub.IMPLEMENTATION, type(d.make_decoder('json')).__module__, d.ReadingBatch.__module__);"
        "print(d.decode_to_rows('json', b'{\"metric\": \"a\", \"value\": 1, \"ts\": 1764072000.123456}', 'x')[0]['ts_us'])"
    )
    e = {k: v for k, v in os.environ.items() if not k.startswith("SENSORHUB_")}
    e.update(PYTHONPATH=str(ROOT), SENSORHUB_PURE_PYTHON="1")
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=ROOT, env=e, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == [
        "python",
        "sensorhub.decoders.jsonpayload_py",
        "sensorhub.decoders.batch_py",
        "1764072000123456",
    ]
    r = run_cli(
        "decode",
        "--format",
        "frame",
        stdin=Frame(readings=[Reading(1, 0, 0, 1.0)]).encode(),
        env={"SENSORHUB_PURE_PYTHON": "1"},
    )
    assert r.returncode == 0 and json.loads(r.stdout)["metric"] == "m1"
