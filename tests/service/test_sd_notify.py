"""sd_notify against a real notify socket: in process, and from a child process with a watchdog."""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
from pathlib import Path

import pytest
from svc_helpers import REPO, NotifyListener, child_argv, child_env

from sensorhub.service import notify
from sensorhub.service.notify import (
    ChdbStatus,
    IngestStatus,
    Watchdog,
    WriterStatus,
    format_status,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(notify, "_warned", set())
    monkeypatch.setattr(notify, "_ready_sent", False)


def test_everything_is_a_noop_without_notify_socket() -> None:
    assert notify.notify_socket() is None
    assert notify.ready("x") is False
    assert notify.status("x") is False
    assert notify.watchdog() is False
    assert notify.stopping() is False
    assert notify.extend_timeout(5) is False
    assert notify.watchdog_interval() is None
    wd = Watchdog()
    assert not wd.enabled
    assert wd.tick() is False


def test_messages_arrive_on_an_abstract_socket_from_our_pid(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert notify.ready("mqtt connected; 0 readings/s; acked 0; dead letters 0") is True
    msg = listener.receive(2.0)
    assert msg is not None
    assert msg.pid == os.getpid()
    assert msg.lines == ("READY=1", "STATUS=mqtt connected; 0 readings/s; acked 0; dead letters 0")
    assert notify.watchdog()
    assert notify.stopping("draining")
    assert notify.extend_timeout(2.5)
    got = [listener.receive(2.0) for _ in range(3)]
    assert [m.lines if m else None for m in got] == [
        ("WATCHDOG=1",),
        ("STOPPING=1", "STATUS=draining"),
        ("EXTEND_TIMEOUT_USEC=2500000",),
    ]


def test_messages_arrive_on_a_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lst = NotifyListener(tmp_path / "notify")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", lst.address)
        assert notify.status("writer up")
        msg = lst.receive(2.0)
        assert msg is not None and msg.lines == ("STATUS=writer up",)
    finally:
        lst.close()


def test_status_text_is_one_bounded_line(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert notify.status("two\nlines   here")
    assert notify.status("x" * 1000)
    first, second = listener.receive(2.0), listener.receive(2.0)
    assert first is not None and first.lines == ("STATUS=two lines here",)
    assert second is not None and len(second.lines) == 1
    assert len(second.lines[0]) == len("STATUS=") + notify.MAX_STATUS_CHARS
    with pytest.raises(ValueError):
        notify.notify("no equals sign")


def test_send_failure_never_raises_and_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@sensorhub-test-nobody-listens-here")
    with caplog.at_level(logging.WARNING, logger="sensorhub.service.notify"):
        results = [notify.watchdog() for _ in range(5)] + [notify.ready("x")]
        wd = Watchdog(0.001)
        ticks = [wd.tick() for _ in range(3)]
    assert results == [False] * 6
    assert ticks == [False, False, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot send" in warnings[0].getMessage()


def test_unsupported_notify_socket_address_is_refused_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 2.0),
        ("2000000", "self", 2.0),
        ("2000000", "1", None),
        ("250000", None, 0.25),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("2000000", "abc", None),
        ("", None, None),
    ],
)
def test_watchdog_interval_from_environment(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert notify.watchdog_interval() == expected


def test_watchdog_pings_at_most_every_half_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "_ready_sent", True)
    now = [100.0]
    sent: list[float] = []

    def send() -> bool:
        sent.append(now[0])
        return True

    def extend() -> bool:
        raise AssertionError("extends the start timeout after READY")

    wd = Watchdog(1.0, send=send, extend=extend, clock=lambda: now[0])
    assert wd.enabled and wd.period == 0.5
    for step in range(300):  # a loop iterating every 10 ms for 3 s
        now[0] = 100.0 + step * 0.01
        wd.tick()
    assert sent[0] == 100.0
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(sent) == 6
    assert all(0.5 - 1e-9 <= g < 0.52 for g in gaps)
    assert wd.pings == 6


def test_before_ready_ticks_extend_the_start_timeout_instead(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    now = [0.0]
    wd = Watchdog(2.0, clock=lambda: now[0])
    assert wd.tick()  # not ready yet: extends the start by one interval
    now[0] = 0.5
    assert not wd.tick()  # paced like pings
    now[0] = 1.0
    assert wd.tick()
    assert notify.ready()
    now[0] = 2.0
    assert wd.tick()
    got = [m.lines for m in listener.collect(0.5)]
    assert got == [
        ("EXTEND_TIMEOUT_USEC=2000000",),
        ("EXTEND_TIMEOUT_USEC=2000000",),
        ("READY=1",),
        ("WATCHDOG=1",),
    ]
    assert (wd.extensions, wd.pings) == (2, 1)


def test_watchdog_rejects_nonsense_intervals() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            Watchdog(bad)


def test_child_ready_then_paced_pings_then_silence_when_its_loop_hangs(listener: NotifyListener) -> None:
    env = child_env()
    env["NOTIFY_SOCKET"] = listener.address
    env["WATCHDOG_USEC"] = "1000000"  # 1 s: pings every 0.5 s
    proc = subprocess.Popen(child_argv("--hang-after", "2.2"), env=env, cwd=REPO)
    try:
        msgs = listener.collect(10.0, until="STATUS=hung")
        assert msgs, "no notification from the child"
        assert msgs[0].pid == proc.pid
        assert msgs[0].has("READY=1")
        assert msgs[0].value("STATUS") == "test connected; 0 readings/s; acked 0; dead letters 0"
        assert msgs[-1].has("STATUS=hung")
        pings = [m.at for m in msgs if m.has("WATCHDOG=1")]
        assert all(m.pid == proc.pid for m in msgs)
        assert len(pings) >= 3
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # Never more often than interval/2, always within the interval.
        assert min(gaps) >= 0.45, gaps
        assert max(gaps) < 1.0, gaps
        # The loop hangs: for longer than the watchdog interval, no ping comes.
        after = listener.collect(1.3)
        assert not [m for m in after if m.has("WATCHDOG=1")]
    finally:
        proc.kill()
        proc.wait(5)


def test_child_does_not_ping_for_a_watchdog_meant_for_another_pid(listener: NotifyListener) -> None:
    env = child_env()
    env["NOTIFY_SOCKET"] = listener.address
    env["WATCHDOG_USEC"] = "200000"
    env["WATCHDOG_PID"] = "1"  # inherited from a watched parent: not ours
    proc = subprocess.run(child_argv("--exit-after", "0.8"), env=env, cwd=REPO, timeout=20, check=False)
    assert proc.returncode == 0
    msgs = listener.collect(0.5)
    assert msgs and msgs[0].has("READY=1")
    assert not [m for m in msgs if m.has("WATCHDOG=1")]


def test_format_status_texts() -> None:
    assert (
        format_status(IngestStatus("mqtt", "connected", 40012.4, 123456, 3))
        == "mqtt connected; 40012 readings/s; acked 123456; dead letters 3"
    )
    assert (
        format_status(IngestStatus("binance", "reconnecting", 0.0, 10, 0, unit="trades"))
        == "binance reconnecting; 0 trades/s; acked 10; dead letters 0"
    )
    assert format_status(WriterStatus("inserting", 41000.0, 0.23, True)) == (
        "inserting 41000 rows/s; lag 0.2 s; clickhouse up"
    )
    assert format_status(WriterStatus("waiting", math.nan, -1.0, False)) == (
        "waiting 0 rows/s; lag 0.0 s; clickhouse down"
    )
    assert format_status(ChdbStatus("127.0.0.1:8123", 12.2, 41000.0)) == (
        "serving 127.0.0.1:8123; 12 queries/s; 41000 rows/s inserted"
    )


def test_documented_status_examples_are_what_format_status_produces() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    for example in (
        format_status(IngestStatus("mqtt", "connected", 40012, 123456, 3)),
        format_status(WriterStatus("inserting", 41000, 0.2, True)),
        format_status(ChdbStatus("127.0.0.1:8123", 12, 41000)),
    ):
        assert example in doc


def test_exports_exist() -> None:
    for name in notify.__all__:
        assert hasattr(notify, name), name
