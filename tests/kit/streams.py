"""Stream entries and consumer groups as the ingest and the writer make them, for writer tests."""

from __future__ import annotations

from typing import Any

from sensorhub.decoders import ReadingBatch
from sensorhub.pipeline.keys import StreamLayout
from sensorhub.pipeline.streams import F_BLOCK, F_KIND, F_SOURCE, KIND_READINGS, encode_block

__all__ = ["create_groups", "readings_entry", "series_entry"]


def readings_entry(batch: ReadingBatch) -> dict[bytes, bytes]:
    """The fields of one readings entry holding ``batch``, as ingest XADDs it."""
    return {F_BLOCK: encode_block(batch, 0), F_SOURCE: b"mqtt", F_KIND: KIND_READINGS}


def series_entry(device: str, n: int, base: int) -> dict[bytes, bytes]:
    """``n`` readings of ``device``'s metric ``temp`` at ``base``, ``base + 1`` ... µs (seq and recv alike)."""
    b = ReadingBatch()
    for i in range(n):
        b.append(device, "temp", base + i, float(i), 0, base + i, base + i)
    return readings_entry(b)


def create_groups(r: Any, layout: StreamLayout, group: str = "writers") -> None:
    """The writers' consumer group on every stream of ``layout``, from the start."""
    for s in layout.all_streams():
        r.xgroup_create(s, group, id="0", mkstream=True)
