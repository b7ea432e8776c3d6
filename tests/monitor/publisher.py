"""A small process that publishes live metrics snapshots like ingest and a writer do.

Run as ``python tests/monitor/publisher.py REDIS_URL SECONDS [LAG_S]``: real
:class:`Metrics` objects count frames and rows, record latencies and publish
every 0.25 s, for at most SECONDS. The writer reports ``lag_s`` LAG_S and a
lag alert when it is over 5 s. A dead letter is written to the DLQ stream at
start, with the reason a person would look for.
"""

from __future__ import annotations

import sys
import time

import redis

from sensorhub.metrics.registry import Metrics
from sensorhub.pipeline.keys import StreamLayout


def main() -> int:
    url, seconds = sys.argv[1], float(sys.argv[2])
    lag_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    r = redis.Redis.from_url(url)
    layout = StreamLayout()
    ingest = Metrics("ingest", "line-7")
    writer = Metrics("writer", "writer-1")
    r.xadd(layout.dlq(0), {b"src": b"line-7", b"topic": b"sensors/a/dev-3/frame", b"payload": b"\x00",
                        b"error": b"ChecksumMismatch: crc mismatch at 41", b"recv_ns": str(time.time_ns()).encode()})
    ingest.inc("dead_letters")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ingest.inc("frames", 50)
        ingest.inc("readings", 400)
        ingest.set("connected", True)
        ingest.set("kind", "reading")
        ingest.set("last_frame_age_s", 0.05)
        ingest.set("redis_ok", True)
        ingest.record_us("recv_to_xadd", 900, 50)
        ingest.record_us("decode_to_xadd", 400, 50)
        writer.inc("rows", 400)
        writer.inc("inserts")
        writer.set("state", "inserting")
        writer.set("lag_s", lag_s)
        writer.set("lag_alert", lag_s > 5)
        writer.set("clickhouse_ok", True)
        writer.set("last_batch_rows", 400)
        writer.record_us("read_to_insert", 3000, 10)
        writer.record_us("insert", 2500, 1)
        ingest.publish(r, layout.metrics_key(ingest.process), 10)
        writer.publish(r, layout.metrics_key(writer.process), 10)
        time.sleep(0.25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
