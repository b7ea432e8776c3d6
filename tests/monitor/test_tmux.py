"""``sensorhub monitor`` as a person sees it: live in tmux, against Redis with a publisher running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TMUX = shutil.which("tmux")

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")


class Tmux:
    """One detached tmux session on a private server socket, killed after the test."""

    def __init__(self, cols: int, rows: int, cmd: str) -> None:
        self.sock = f"sh-mon-{uuid.uuid4().hex[:8]}"
        self.name = "mon"
        self._run("new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows), cmd)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert TMUX is not None
        return subprocess.run([TMUX, "-L", self.sock, *args], capture_output=True, text=True, timeout=10)

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", self.name).stdout

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", self.name, *keys)

    def alive(self) -> bool:
        return self._run("has-session", "-t", self.name).returncode == 0

    def close(self) -> None:
        self._run("kill-server")


@pytest.fixture
def publisher(redis_server: Any, redis_client: Any) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/monitor/publisher.py"), redis_server.url, "40", "9"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield p
    p.terminate()
    p.wait(timeout=10)


def _monitor_cmd(redis_url: str) -> str:
    # a cleared environment would lose the venv: run the same interpreter explicitly
    return (f"cd {ROOT} && TERM=xterm-256color {sys.executable} -m sensorhub monitor --redis {redis_url}"
            f" --no-clickhouse --refresh 0.5 --exit-after 40")


def test_live_monitor_in_80x24(
    publisher: subprocess.Popen[bytes], redis_server: Any, wait_until: Callable[..., Any]
) -> None:
    t = Tmux(80, 24, _monitor_cmd(redis_server.url))
    try:
        def rate(s: str) -> float:
            row = next((x.split() for x in s.splitlines() if "line-7" in x and " ok " in x), None)
            return float(row[3].replace(",", "")) if row else 0.0  # the rows/s column

        def shown() -> str | None:
            s = t.screen()
            return s if "LAG ALERT" in s and "writer-1 inserting" in s and rate(s) > 0 else None

        # the first snapshot of a process has no rates yet; the next ones do
        screen = wait_until(shown, timeout=20, interval=0.3)
        assert screen, f"monitor never showed flowing data with the lag alert; screen:\n{t.screen()}"
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(x) <= 80 for x in lines)
        assert "flowing: yes" in screen

        # d puts the dead letters first, with the reason
        t.keys("d")
        focused = wait_until(lambda: (s := t.screen()) and "[d]ead*" in s and s, timeout=5, interval=0.2)
        assert focused, t.screen()
        dl = focused.splitlines()
        i = next(n for n, x in enumerate(dl) if x.startswith("DEAD LETTERS"))
        assert i < next(n for n, x in enumerate(dl) if x.startswith("PIPELINE"))
        assert "ChecksumMismatch" in dl[i + 1]

        # s cycles the sort order
        t.keys("s")
        assert wait_until(lambda: "[s]ort:rate" in t.screen(), timeout=5, interval=0.2), t.screen()

        # q quits and the terminal is given back
        t.keys("q")
        assert wait_until(lambda: not t.alive(), timeout=5, interval=0.2), "monitor did not quit on q"
    finally:
        t.close()


def test_live_monitor_uses_a_large_terminal(
    publisher: subprocess.Popen[bytes], redis_server: Any, wait_until: Callable[..., Any]
) -> None:
    t = Tmux(160, 45, _monitor_cmd(redis_server.url))
    try:
        # every frame is laid out for the terminal's current size
        screen = wait_until(lambda: (s := t.screen()) and "╭─ sources" in s and "LAG ALERT" in s and s,
                            timeout=20, interval=0.3)
        assert screen, t.screen()
        assert "╭─ latency (ms)" in screen and "p99 history" in screen and "reconn" in screen
        # sparklines grow as the history fills
        assert wait_until(lambda: any(x.count("█") + x.count("▇") >= 2 and "read_to_insert" in x
                                      for x in t.screen().splitlines()), timeout=10, interval=0.5), t.screen()
        t.keys("q")
        assert wait_until(lambda: not t.alive(), timeout=5, interval=0.2)
    finally:
        t.close()
