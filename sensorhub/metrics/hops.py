"""The hops of the data path whose latency the processes record: the one list of their names.

Ingest and the writers record these (``Metrics.record_us``), the monitor
shows them and names the worst, the Prometheus exporter labels its
histograms with them and the writer stores them in ``hop_latency``. A test
checks that every ``record_us`` call in ``sensorhub/`` names a hop of
:data:`HOPS` and that every hop of :data:`HOPS` is recorded somewhere.
"""

from __future__ import annotations

__all__ = [
    "DECODE_TO_XADD",
    "DEVICE_TO_INSERT",
    "HOPS",
    "INSERT",
    "PIPELINE_HOPS",
    "READ_TO_INSERT",
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

#: Every hop, in data-path order (the monitor's latency panel shows them so).
HOPS: tuple[str, ...] = (
    DECODE_TO_XADD,
    RECV_TO_XADD,
    XADD_TO_READ,
    READ_TO_INSERT,
    INSERT,
    RECV_TO_INSERT,
    DEVICE_TO_INSERT,
)

#: The stages the pipeline itself adds, among which the monitor names the worst p99.
#: Left out: the end-to-end hops, which sum the stages (and ``device_to_*`` includes
#: the device's clock skew), so a drifting percentile points at its stage.
PIPELINE_HOPS: frozenset[str] = frozenset({DECODE_TO_XADD, RECV_TO_XADD, XADD_TO_READ, READ_TO_INSERT, INSERT})
