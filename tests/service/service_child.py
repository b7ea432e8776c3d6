"""A small service process for the tests: it uses sensorhub.service the way ingest and writer do.

    python service_child.py [--hang-after S] [--ignore-term] [--exit-after S --code N]
                            [--drain-steps N] [--no-ready]

It installs the signal handlers, sends READY=1 with a STATUS line, and runs a
work loop that ticks the watchdog every 10 ms. ``--hang-after`` makes the loop
stop ticking (a hung loop) after S seconds and announce it with
``STATUS=hung``. On SIGTERM it drains (``--drain-steps`` steps of 20 ms) and
exits 0, printing the drain result. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from sensorhub.service import notify
from sensorhub.service.lifecycle import Lifecycle, drain

LIFETIME_S = 60.0  # no test child outlives this, whatever happens to the test


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hang-after", type=float, default=None)
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--exit-after", type=float, default=None)
    ap.add_argument("--code", type=int, default=0)
    ap.add_argument("--drain-steps", type=int, default=3)
    ap.add_argument("--no-ready", action="store_true")
    args = ap.parse_args()

    life = Lifecycle("test child")
    life.install_signal_handlers()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    start = time.monotonic()
    if not args.no_ready:
        life.ready(notify.format_status(notify.IngestStatus("test", "connected", 0.0, 0, 0)))
    n = 0
    while not life.stop.is_set() and time.monotonic() - start < LIFETIME_S:
        elapsed = time.monotonic() - start
        if args.exit_after is not None and elapsed >= args.exit_after:
            return args.code
        if args.hang_after is not None and elapsed >= args.hang_after:
            notify.status("hung")
            # The hung loop: no more ticks, until killed or the lifetime ends.
            life.stop.wait(LIFETIME_S - elapsed)
            return 3
        n += 1
        life.watchdog.tick()
        life.status_every(lambda n=n: notify.format_status(notify.IngestStatus("test", "connected", 100.0, n, 0)))
        time.sleep(0.01)

    left = [args.drain_steps]

    def step(remaining: float) -> bool:
        time.sleep(min(0.02, remaining))
        left[0] -= 1
        return left[0] <= 0

    result = drain(step, timeout_s=5.0, watchdog=life.watchdog)
    print(f"drained complete={result.complete} steps={result.steps} reason={life.stop_reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
