"""Dead-letter replay: decode dead letters again after a fix, store what now decodes, once.

A payload is dead-lettered raw, with its topic and receive time. After the
cause is fixed (a configuration such as ``mqtt.max_payload_bytes`` or the
metric dictionary, a decoder upgrade), ``sensorhub dlq replay`` decodes the
dead letters not replayed yet, in ``entry_id`` order and in fixed chunks,
and inserts the readings of each chunk into ``readings`` with an
``insert_deduplication_token`` derived from the chunk's entry ids. It then
records the chunk in ``dead_letter_replays``. A replay interrupted between
the two repeats the same chunk with the same token, and ClickHouse drops it
as a duplicate. Dead letters that still do not decode stay where they are,
and the reason is reported.

Readings the writer dead-lettered (topic ``$sensorhub/readings/<device>``,
see :mod:`sensorhub.pipeline.rejected`) are decoded as the JSON payloads
they are. Every replayed reading must be inside the device-time window of
the settings the replay runs with (``writer.device_time_max_past_s`` /
``_future_s``): a dead letter with a reading outside stays, with that
reason, until the window is widened.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from sensorhub.config import Settings
from sensorhub.decoders import ReadingBatch, make_decoder
from sensorhub.errors import DecodeError
from sensorhub.pipeline.entrycodec_py import NATIVE_COLUMNS
from sensorhub.pipeline.rejected import READING_TOPIC, DeviceTimeWindow
from sensorhub.pipeline.streams import encode_block, native_block
from sensorhub.sources.mqtt.routing import route_topic

__all__ = ["ReplayReport", "replay_dead_letters"]

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass
class ReplayReport:
    considered: int = 0
    replayed: int = 0
    readings: int = 0
    still_failing: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def replay_dead_letters(
    settings: Settings, ch: Any, source: str | None = None, dry_run: bool = False, limit: int = 1_000_000
) -> ReplayReport:
    db = settings.clickhouse.database
    where = f"d.entry_id NOT IN (SELECT entry_id FROM {db}.dead_letter_replays)"
    params: dict[str, Any] = {}
    if source:
        where += " AND d.source = {src:String}"
        params["src"] = source
    rows = ch.query(
        f"SELECT d.entry_id, d.source, d.topic, d.payload, toUnixTimestamp64Micro(d.recv) "
        f"FROM {db}.dead_letters AS d WHERE {where} ORDER BY d.entry_id LIMIT {int(limit)}",
        parameters=params,
        column_formats={"payload": "bytes"},  # raw frames are not UTF-8
    ).result_rows
    decoders = {fmt: make_decoder(fmt, dict(settings.dictionary)) for fmt in ("frame", "json", "ilp")}
    window = DeviceTimeWindow.of(settings.writer.device_time_max_past_s, settings.writer.device_time_max_future_s)
    report = ReplayReport(considered=len(rows))
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        natives: list[bytes] = []
        replayed: list[list[Any]] = []
        for entry_id, src, topic, payload, recv_us in chunk:
            raw = payload if isinstance(payload, bytes) else str(payload).encode("utf-8", "surrogateescape")
            batch = ReadingBatch()
            try:
                if topic.startswith(READING_TOPIC):  # a reading the writer dead-lettered, as JSON
                    n = decoders["json"].decode(topic[len(READING_TOPIC) :], raw, int(recv_us) * 1000, batch)
                else:
                    route = route_topic(settings.mqtt.routes, topic)
                    if route is None:
                        raise DecodeError(f"no route serves topic {topic!r}")
                    r, device = route
                    if len(raw) > settings.mqtt.max_payload_bytes:
                        raise DecodeError(f"payload of {len(raw)} bytes over mqtt.max_payload_bytes")
                    n = decoders[r.format].decode(device, raw, int(recv_us) * 1000, batch)
                outside = window.outside(batch.column("ts_us"), batch.column("recv_us"))
                if outside:
                    raise DecodeError(outside[0][1])
            except DecodeError as exc:
                report.still_failing += 1
                key = f"{type(exc).__name__}: {exc}"[:120]
                report.reasons[key] = report.reasons.get(key, 0) + 1
                continue
            if n:
                native, _ = native_block(encode_block(batch, 0), src)
                natives.append(native)
            replayed.append([entry_id, n])
            report.readings += n
        report.replayed += len(replayed)
        if dry_run or not replayed:
            continue
        token = "dlq-" + hashlib.sha256("\x00".join(r[0] for r in chunk).encode()).hexdigest()[:40]
        if natives:
            ch.raw_insert(
                f"{db}.readings",
                column_names=[c for c, _ in NATIVE_COLUMNS],
                insert_block=b"".join(natives),
                settings={"insert_deduplication_token": token},
                fmt="Native",
            )
        ch.insert(
            f"{db}.dead_letter_replays",
            replayed,
            column_names=["entry_id", "readings"],
            settings={"insert_deduplication_token": token},
        )
        log.info("replayed %d dead letters (%d readings)", len(replayed), sum(r[1] for r in replayed))
    return report
