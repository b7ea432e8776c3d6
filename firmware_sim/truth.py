"""Ground truth: what the simulator published, in a compact file a verifier reads.

File layout (little-endian)::

    b"SHTRUTH1"
    chunk*            u32 length, then a zstd frame holding one columnar chunk:
                      u32 n, device u32[n], metric u32[n], ts_us i64[n], seq i64[n],
                      value f64[n], flags u8[n]
    summary           UTF-8 JSON (see :class:`TruthWriter.summary`)
    u32 summary length, b"SHTRUEND"

``device`` and ``metric`` index the summary's ``devices`` and ``metrics``
tables. ``seq`` is -1 when the format carries no sequence (line protocol,
Sparkplug). Flag bit 0: the reading's clock was skewed on purpose (left out of
latency). Per device the summary holds the published count and a checksum:
the sum, modulo 2**64, of each value's IEEE 754 bits (NaN counted as the
canonical quiet NaN), which ClickHouse computes the same way.

The full set of readings is written while the run stays under ``full_limit``
readings; past it only the counts and checksums are kept.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

__all__ = [
    "CANONICAL_NAN_BITS",
    "FLAG_SKEWED",
    "TruthChunk",
    "TruthWriter",
    "merge_truth",
    "read_summary",
    "read_truth",
    "value_checksum",
]

MAGIC = b"SHTRUTH1"
END = b"SHTRUEND"
FLAG_SKEWED = 1
CANONICAL_NAN_BITS = 0x7FF8000000000000
_U32 = struct.Struct("<I")
_CHUNK_ROWS = 65536


def value_checksum(values: np.ndarray) -> int:
    """Sum modulo 2**64 of the IEEE 754 bit patterns of ``values`` (NaN canonicalised)."""
    v = np.asarray(values, dtype=np.float64)
    bits = v.view(np.uint64).copy()
    bits[np.isnan(v)] = np.uint64(CANONICAL_NAN_BITS)
    return int(bits.sum(dtype=np.uint64))


@dataclass(slots=True)
class TruthChunk:
    """Columns of a run of readings."""

    device: np.ndarray
    metric: np.ndarray
    ts_us: np.ndarray
    seq: np.ndarray
    value: np.ndarray
    flags: np.ndarray


class TruthWriter:
    """Records published readings; :meth:`close` writes the file.

    ``add`` is called once per published message with its rows; the columns
    are buffered in ``array`` objects (cheap appends) and compressed in chunks.
    """

    def __init__(
        self,
        path: str | Path | None,
        devices: list[str],
        metrics: list[str],
        *,
        full_limit: int = 2_000_000,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.devices = devices
        self.metrics = metrics
        self.full_limit = full_limit
        self.meta = dict(meta or {})
        self.counts = np.zeros(len(devices), dtype=np.int64)
        self.checksums = np.zeros(len(devices), dtype=np.uint64)
        self.total = 0
        self.full = True
        self.dead_letters: dict[str, int] = {}
        self.dead_letter_devices: dict[str, int] = {}
        self.duplicates_sent = 0
        self.events: dict[str, int] = {}
        self.ts_min = 0
        self.ts_max = 0
        self._dev = array("I")
        self._met = array("I")
        self._ts = array("q")
        self._seq = array("q")
        self._val = array("d")
        self._flags = array("B")
        self._fh = None
        self._cctx = zstandard.ZstdCompressor(level=3)
        if self.path is not None:
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._fh.write(MAGIC)

    def add(self, device: int, metric_map: list[int], rows: list[tuple[int, int, int, float]], flags: int) -> None:
        """Record the rows of one published message of ``device``."""
        dev = self._dev
        met = self._met
        ts = self._ts
        seq = self._seq
        val = self._val
        fl = self._flags
        for m, t, s, v in rows:
            dev.append(device)
            met.append(metric_map[m])
            ts.append(t)
            seq.append(s)
            val.append(v)
            fl.append(flags)
        if len(dev) >= _CHUNK_ROWS:
            self._flush()

    def dead_letter(self, device: str, reason: str) -> None:
        """Record one faulty message sent on purpose: it belongs in ``dead_letters``."""
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1
        self.dead_letter_devices[device] = self.dead_letter_devices.get(device, 0) + 1

    def event(self, name: str, n: int = 1) -> None:
        """Count a fault event (duplicate sent, reconnect, device death...)."""
        self.events[name] = self.events.get(name, 0) + n

    def _flush(self) -> None:
        n = len(self._dev)
        if n == 0:
            return
        # Copies, so the arrays can be cleared below while numpy holds the data.
        d = np.frombuffer(self._dev.tobytes(), dtype=np.uint32)
        ts = np.frombuffer(self._ts.tobytes(), dtype=np.int64)
        v = np.frombuffer(self._val.tobytes(), dtype=np.float64)
        np.add.at(self.counts, d, 1)
        bits = v.view(np.uint64).copy()
        bits[np.isnan(v)] = np.uint64(CANONICAL_NAN_BITS)
        np.add.at(self.checksums, d, bits)
        lo, hi = int(ts.min()), int(ts.max())
        self.ts_min = lo if self.total == 0 else min(self.ts_min, lo)
        self.ts_max = hi if self.total == 0 else max(self.ts_max, hi)
        self.total += n
        if self.total > self.full_limit:
            self.full = False
        if self._fh is not None and self.full:
            raw = (
                _U32.pack(n)
                + self._dev.tobytes()
                + self._met.tobytes()
                + self._ts.tobytes()
                + self._seq.tobytes()
                + self._val.tobytes()
                + self._flags.tobytes()
            )
            comp = self._cctx.compress(raw)
            self._fh.write(_U32.pack(len(comp)) + comp)
        for a in (self._dev, self._met, self._ts, self._seq, self._val, self._flags):
            del a[:]

    def summary(self) -> dict[str, Any]:
        """The JSON summary: tables, totals, per-device counts and checksums, faults."""
        return {
            "devices": self.devices,
            "metrics": self.metrics,
            "published": self.total,
            "full": self.full,
            "ts_min_us": self.ts_min,
            "ts_max_us": self.ts_max,
            "counts": [int(c) for c in self.counts],
            "checksums": [str(int(c)) for c in self.checksums],
            "dead_letters": self.dead_letters,
            "dead_letter_devices": self.dead_letter_devices,
            "events": self.events,
            "meta": self.meta,
        }

    def close(self) -> dict[str, Any]:
        """Flush, write the summary (when writing a file) and return it."""
        self._flush()
        s = self.summary()
        if self._fh is not None:
            if not self.full:
                # The chunk stream is incomplete: drop it so no reader trusts it.
                self._fh.seek(len(MAGIC))
                self._fh.truncate()
            blob = json.dumps(s, separators=(",", ":")).encode()
            self._fh.write(blob + _U32.pack(len(blob)) + END)
            self._fh.close()
            self._fh = None
        return s


def _trailer(data: memoryview | bytes) -> tuple[dict[str, Any], int]:
    if len(data) < len(MAGIC) + 12 or bytes(data[: len(MAGIC)]) != MAGIC or bytes(data[-8:]) != END:
        raise ValueError("not a firmware_sim truth file (bad magic or cut short)")
    (n,) = _U32.unpack(bytes(data[-12:-8]))
    start = len(data) - 12 - n
    if start < len(MAGIC):
        raise ValueError("truth file summary length is out of range")
    summary: dict[str, Any] = json.loads(bytes(data[start : len(data) - 12]))
    return summary, start


def read_summary(path: str | Path) -> dict[str, Any]:
    """The summary of a truth file, without reading its readings."""
    return _trailer(Path(path).read_bytes())[0]


def _chunks(data: bytes, end: int) -> Iterator[bytes]:
    """The compressed chunks of a truth file, as stored."""
    i = len(MAGIC)
    while i < end:
        (n,) = _U32.unpack_from(data, i)
        i += 4
        if i + n > end:
            raise ValueError("truth file chunk runs past the summary")
        yield data[i : i + n]
        i += n


def read_truth(path: str | Path) -> tuple[dict[str, Any], Iterator[TruthChunk]]:
    """The summary and an iterator over the readings' chunks (empty when the file is not full)."""
    data = Path(path).read_bytes()
    summary, end = _trailer(data)
    dctx = zstandard.ZstdDecompressor()

    def it() -> Iterator[TruthChunk]:
        for comp in _chunks(data, end):
            raw = dctx.decompress(comp)
            (n,) = _U32.unpack_from(raw, 0)
            off = 4
            cols = []
            for dt, size in (("<u4", 4), ("<u4", 4), ("<i8", 8), ("<i8", 8), ("<f8", 8), ("u1", 1)):
                cols.append(np.frombuffer(raw, dtype=dt, count=n, offset=off))
                off += size * n
            yield TruthChunk(*cols)

    return summary, it()


def merge_truth(parts: list[Path], out: Path) -> dict[str, Any]:
    """Merge the truth files of several processes (same device and metric tables) into ``out``."""
    summaries = []
    with open(out, "wb") as fh:
        fh.write(MAGIC)
        full = True
        datas = []
        for p in parts:
            data = p.read_bytes()
            s, end = _trailer(data)
            summaries.append(s)
            full = full and bool(s["full"])
            datas.append((data, end))
        if full:
            for data, end in datas:
                for comp in _chunks(data, end):
                    fh.write(_U32.pack(len(comp)) + comp)
        merged = dict(summaries[0])
        n_dev = len(merged["devices"])
        counts = [0] * n_dev
        checks = [0] * n_dev
        dl: dict[str, int] = {}
        dld: dict[str, int] = {}
        ev: dict[str, int] = {}
        for s in summaries:
            if s["devices"] != merged["devices"] or s["metrics"] != merged["metrics"]:
                raise ValueError("truth parts describe different devices or metrics")
            for i in range(n_dev):
                counts[i] += s["counts"][i]
                checks[i] = (checks[i] + int(s["checksums"][i])) % (1 << 64)
            for src, dst in ((s["dead_letters"], dl), (s["dead_letter_devices"], dld), (s["events"], ev)):
                for k, v in src.items():
                    dst[k] = dst.get(k, 0) + v
        nonempty = [s for s in summaries if s["published"]]
        merged.update(
            published=sum(s["published"] for s in summaries),
            full=full,
            ts_min_us=min((s["ts_min_us"] for s in nonempty), default=0),
            ts_max_us=max((s["ts_max_us"] for s in nonempty), default=0),
            counts=counts,
            checksums=[str(c) for c in checks],
            dead_letters=dl,
            dead_letter_devices=dld,
            events=ev,
        )
        blob = json.dumps(merged, separators=(",", ":")).encode()
        fh.write(blob + _U32.pack(len(blob)) + END)
    return merged
