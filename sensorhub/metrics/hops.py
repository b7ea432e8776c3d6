"""The hops of the data path whose latency the processes record: the one list of their names.

Ingest, the writers and the alert processes record these (``Metrics.record_us``), the monitor
shows them and names the worst, the Prometheus exporter labels its
histograms with them and the writer stores them in ``hop_latency``. A test
checks that every ``record_us`` call in ``sensorhub/`` names a hop of
:data:`HOPS` and that every hop of :data:`HOPS` is recorded somewhere.
"""

from __future__ import annotations

__all__ = [
    "ALERT_HOPS",
    "ALERT_TO_GATEWAY",
    "DECODE_TO_XADD",
    "DEVICE_TO_INSERT",
    "HOPS",
    "INSERT",
    "PIPELINE_HOPS",
    "READ_TO_INSERT",
    "RECV_TO_ALERT",
    "RECV_TO_INSERT",
    "RECV_TO_XADD",
    "XADD_TO_READ",
]

# recorded by ingest
DECODE_TO_XADD = "decode_to_xadd"  # block closed -> its MULTI/XADD acknowledged by Redis (per flush)
RECV_TO_XADD = "recv_to_xadd"  # frame received -> in Redis (batching wait, decode and XADD; per frame)
# recorded by the writer
XADD_TO_READ = "xadd_to_read"  # XADD -> XREADGROUP by a writer (per reading)
READ_TO_INSERT = "read_to_insert"  # XREADGROUP -> INSERT acknowledged by ClickHouse (per reading)
INSERT = "insert"  # the INSERT call alone (per INSERT)
RECV_TO_INSERT = "recv_to_insert"  # frame received -> INSERT done: what the pipeline adds (sampled readings)
DEVICE_TO_INSERT = "device_to_insert"  # device time -> INSERT done: end to end, with clock skew (sampled)
# recorded by the alert evaluator and the gateway (a side path: not among PIPELINE_HOPS)
RECV_TO_ALERT = "recv_to_alert"  # frame received -> alert event emitted (per event that opens)
ALERT_TO_GATEWAY = "alert_to_gateway"  # alert event emitted -> the gateway has it (per event)

#: Every hop, in data-path order (the monitor's latency panel shows them so).
HOPS: tuple[str, ...] = (
    DECODE_TO_XADD,
    RECV_TO_XADD,
    XADD_TO_READ,
    READ_TO_INSERT,
    INSERT,
    RECV_TO_INSERT,
    DEVICE_TO_INSERT,
    RECV_TO_ALERT,
    ALERT_TO_GATEWAY,
)

#: The hops only a stack with alert rules records.
ALERT_HOPS: tuple[str, ...] = (RECV_TO_ALERT, ALERT_TO_GATEWAY)

#: The stages the pipeline itself adds, among which the monitor names the worst p99.
#: Left out: the end-to-end hops, which sum the stages (and ``device_to_*`` includes
#: the device's clock skew), so a drifting percentile points at its stage.
PIPELINE_HOPS: frozenset[str] = frozenset({DECODE_TO_XADD, RECV_TO_XADD, XADD_TO_READ, READ_TO_INSERT, INSERT})
