"""Signals, STOPPING=1 and the bounded drain, in process and in a real child process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from svc_helpers import REPO, NotifyListener, child_argv, child_env

from sensorhub.service import notify
from sensorhub.service.lifecycle import Lifecycle, drain, drain_async


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(notify, "_ready_sent", False)


def test_sigterm_sends_stopping_drains_and_exits_cleanly(listener: NotifyListener) -> None:
    env = child_env()
    env["NOTIFY_SOCKET"] = listener.address
    env["WATCHDOG_USEC"] = "1000000"
    proc = subprocess.Popen(child_argv("--drain-steps", "4"), env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        first = listener.receive(10.0)
        assert first is not None and first.has("READY=1")
        proc.send_signal(signal.SIGTERM)
        msgs = listener.collect(5.0, until="STOPPING=1")
        stopping = [m for m in msgs if m.has("STOPPING=1")]
        assert stopping and stopping[0].pid == proc.pid
        assert stopping[0].value("STATUS") == "draining (SIGTERM)"
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode == 0
    assert "drained complete=True steps=4 reason=SIGTERM" in out


def test_request_stop_is_idempotent_and_runs_callbacks_once(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    life = Lifecycle("unit test", watchdog=notify.Watchdog(None))
    calls: list[str] = []
    life.add_stop_callback(lambda: calls.append("a"))

    def broken() -> None:
        raise RuntimeError("a broken callback")

    life.add_stop_callback(broken)
    life.add_stop_callback(lambda: calls.append("c"))
    life.request_stop("test")
    life.request_stop("again")
    assert life.stop.is_set()
    assert life.stop_reason == "test"
    assert calls == ["a", "c"]
    msgs = listener.collect(0.5)
    assert [m.lines for m in msgs] == [("STOPPING=1", "STATUS=draining (test)")]


def test_ready_is_sent_once_then_only_status(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    life = Lifecycle("unit test", watchdog=notify.Watchdog(None), status_interval_s=60.0)
    life.ready("one")
    life.ready("two")
    assert life.status_every("three") is True
    assert life.status_every(lambda: pytest.fail("evaluated although not due")) is False
    msgs = listener.collect(0.5)
    assert [m.lines for m in msgs] == [("READY=1", "STATUS=one"), ("STATUS=two",), ("STATUS=three",)]


def test_signal_handlers_set_the_stop_event_and_second_sigint_interrupts() -> None:
    life = Lifecycle("unit test", watchdog=notify.Watchdog(None))
    before = signal.getsignal(signal.SIGTERM)
    life.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert life.stop.wait(2.0)
        assert life.stop_reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is ignored: the drain continues
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(200):
                time.sleep(0.01)
    finally:
        life.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_handlers_in_an_asyncio_loop() -> None:
    async def main() -> str:
        life = Lifecycle("unit test", watchdog=notify.Watchdog(None))
        stopped = asyncio.Event()
        life.add_stop_callback(stopped.set)
        life.install_signal_handlers(asyncio.get_running_loop())
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.wait_for(stopped.wait(), 2.0)
        finally:
            life.restore_signal_handlers()
        return life.stop_reason

    assert asyncio.run(main()) == "SIGINT"


def test_drain_completes_when_the_step_says_so() -> None:
    # The watchdog reads a clock the steps move, so its pacing is checked without timing anything.
    now = [100.0]
    left = [3]

    def step(remaining: float) -> bool:
        assert remaining > 0
        left[0] -= 1
        now[0] += 0.3  # three steps: 0.9 s on the watchdog's clock, past one half-interval
        return left[0] == 0

    ticks: list[float] = []

    def send() -> bool:
        ticks.append(now[0])
        return True

    wd = notify.Watchdog(1.0, send=send, extend=send, clock=lambda: now[0])
    result = drain(step, timeout_s=5.0, watchdog=wd)
    assert result.complete and result.steps == 3
    # ticked after each step, sent after the first and again only once 0.5 s had passed
    assert ticks == [pytest.approx(100.3), pytest.approx(100.9)]


def test_drain_stops_at_its_bound() -> None:
    seen: list[float] = []

    def step(remaining: float) -> bool:
        seen.append(remaining)
        time.sleep(min(0.05, remaining))
        return False

    t0 = time.monotonic()
    result = drain(step, timeout_s=0.3)
    took = time.monotonic() - t0
    assert not result.complete
    assert result.steps == len(seen) >= 2
    # each step is told the time left, which only shrinks, and none is started after the bound
    assert all(0 < r <= 0.3 for r in seen) and seen == sorted(seen, reverse=True)
    assert result.elapsed_s >= 0.3 and took >= 0.3
    assert took < 3.0  # liveness only (10x the bound); the overshoot is measured by benchmarks/service.py
    assert drain(step, timeout_s=0.0).steps == 0
    with pytest.raises(ValueError):
        drain(step, timeout_s=float("inf"))


def test_drain_async_cancels_a_step_that_outlives_the_bound() -> None:
    cancelled: list[bool] = []

    async def stuck(remaining: float) -> bool:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return True

    async def quick(remaining: float) -> bool:
        await asyncio.sleep(0)
        return True

    t0 = time.monotonic()
    result = asyncio.run(drain_async(stuck, timeout_s=0.3))
    assert not result.complete and result.steps == 1
    assert cancelled == [True]
    assert time.monotonic() - t0 < 3.0  # liveness only: the step alone would take 30 s
    assert asyncio.run(drain_async(quick, timeout_s=1.0)).complete
