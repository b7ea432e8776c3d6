"""Helpers of the fault scenarios: real processes killed, stopped and restarted while the simulator publishes.

Every scenario ends with the same checks: published == count() of the run's
readings (without FINAL), no duplicate natural keys, identical values, and
the audit reconciles. ``make test`` runs them at a reduced but real load;
``make faults`` sets ``SENSORHUB_FAULT_RATE`` / ``SENSORHUB_FAULT_SECONDS``
for the full 40k readings/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

RATE = float(os.environ.get("SENSORHUB_FAULT_RATE", "5000"))
SECONDS = float(os.environ.get("SENSORHUB_FAULT_SECONDS", "10"))
RESULTS = Path(os.environ.get("SENSORHUB_FAULT_RESULTS", "benchmarks/results/faults"))


@dataclass
class Run:
    """One simulator run against a stack, with the fault applied part way."""

    stack: Any
    tmp: Path
    rate: float = RATE
    seconds: float = SECONDS
    per_message: int = 10
    fmt: str = "frame"
    proc: subprocess.Popen[str] | None = None
    truth: Path = field(init=False)
    peak_rss: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.truth = self.tmp / "run.truth"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "firmware_sim", "run",
            "--stack", str(self.stack.dir),
            "--rate", str(self.rate), "--duration", str(self.seconds),
            "--devices", "200", "--format", self.fmt, "--per-message", str(self.per_message),
            "--qos", "1", "--truth", str(self.truth), "--json", "--ack-timeout", "120",
            # every reading kept in the truth file, so values are compared one by one
            "--full-limit", str(int(self.rate * self.seconds * 1.2) + 1000),
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample_rss(self) -> None:
        for name, pid in self.stack.status()["pids"].items():
            try:
                rss = psutil.Process(pid).memory_info().rss
            except (psutil.Error, TypeError):
                continue
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)

    def sleep(self, seconds: float) -> None:
        """Sleep while sampling every process's RSS."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sample_rss()
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def finish(self, store_timeout: float = 240.0) -> dict[str, Any]:
        assert self.proc is not None
        while self.proc.poll() is None:
            self.sleep(0.5)
        out, err = self.proc.communicate()
        assert self.proc.returncode == 0, f"simulator failed:\n{out}\n{err[-3000:]}"
        pub = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        # wait until the store holds everything (bounded)
        ch = self.stack.ch()
        want = int(pub["published"])
        t0 = time.monotonic()
        deadline = t0 + store_timeout
        stored = -1
        while time.monotonic() < deadline:
            stored = int(ch.command("SELECT count() FROM sensorhub.readings WHERE source = 'mqtt'"))
            if stored >= want:
                break
            self.sleep(0.5)
        self.notes["store_wait_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # anything late (a duplicate) would show now
        v = subprocess.run(
            [sys.executable, "-m", "firmware_sim", "verify", "--clickhouse", self.stack.clickhouse_url,
             "--truth", str(self.truth), "--json"],
            capture_output=True, text=True, timeout=300,
        )
        result: dict[str, Any] = json.loads([ln for ln in v.stdout.splitlines() if ln.startswith("{")][-1])
        result["publisher"] = {k: pub.get(k) for k in ("published", "achieved_rate", "unacked_messages", "reconnects")}
        result["count_all"] = int(ch.command("SELECT count() FROM sensorhub.readings"))
        result["distinct_all"] = int(
            ch.command("SELECT uniqExact(device, metric, ts, seq) FROM sensorhub.readings")
        )
        audit = subprocess.run(
            [sys.executable, "-m", "sensorhub", "audit", "--reconcile", "--json",
             "--redis", self.stack.redis_url, "--clickhouse", self.stack.clickhouse_url],
            capture_output=True, text=True, timeout=120,
        )
        result["audit_ok"] = audit.returncode == 0
        result["audit"] = json.loads(audit.stdout) if audit.stdout.startswith("{") else audit.stderr[-2000:]
        result["peak_rss_mb"] = {k: round(v / 2**20, 1) for k, v in self.peak_rss.items()}
        result["notes"] = self.notes
        return result


def check_exactly_once(r: dict[str, Any]) -> None:
    assert r["published"] > 0
    assert r["lost"] == 0, r
    assert r["duplicated"] == 0, r
    assert r["mismatched"] == 0, r
    assert r["stored"] == r["published"], r
    assert r["count_all"] == r["distinct_all"], r
    assert r["audit_ok"], r["audit"]


def record(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


