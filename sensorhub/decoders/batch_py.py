"""Columnar batch of readings: the pure-Python twin of ``cython_ext/batch.pyx``.

A batch holds readings as parallel columns: ``device`` and ``metric`` as
indexes into per-batch string tables (``devices``, ``metrics``), ``ts_us``
(device time, µs since the epoch), ``value``, ``quality``, ``seq`` and
``recv_us`` (ingest time, µs). Decoders call :meth:`begin` before a payload and
:meth:`rollback` when it turns out invalid, so a batch never holds part of a
bad payload. Buffers grow geometrically up to 65,536 rows, then linearly.
"""

from __future__ import annotations

from array import array
from typing import Any

COLUMNS = ("device", "metric", "ts_us", "value", "quality", "seq", "recv_us")


class ReadingBatch:
    """Columnar readings with interned device and metric names."""

    __slots__ = (
        "_dev_index",
        "_mark_dev",
        "_mark_met",
        "_mark_n",
        "_met_index",
        "dev",
        "devices",
        "met",
        "metrics",
        "quality",
        "recv_us",
        "seq",
        "ts_us",
        "value",
    )

    def __init__(self, capacity: int = 1024) -> None:
        self.clear()

    def clear(self) -> None:
        self.dev: array[int] = array("I")
        self.met: array[int] = array("I")
        self.ts_us: array[int] = array("q")
        self.value: array[float] = array("d")
        self.quality: array[int] = array("B")
        self.seq: array[int] = array("Q")
        self.recv_us: array[int] = array("q")
        self.devices: list[str] = []
        self.metrics: list[str] = []
        self._dev_index: dict[str, int] = {}
        self._met_index: dict[str, int] = {}
        self._mark_n = self._mark_dev = self._mark_met = 0

    def __len__(self) -> int:
        return len(self.ts_us)

    @property
    def capacity(self) -> int:
        return len(self.ts_us)

    def intern_device(self, name: str) -> int:
        idx = self._dev_index.get(name)
        if idx is None:
            idx = len(self.devices)
            self.devices.append(name)
            self._dev_index[name] = idx
        return idx

    def intern_metric(self, name: str) -> int:
        idx = self._met_index.get(name)
        if idx is None:
            idx = len(self.metrics)
            self.metrics.append(name)
            self._met_index[name] = idx
        return idx

    def push(self, dev: int, met: int, ts: int, v: float, q: int, s: int, recv: int) -> None:
        self.dev.append(dev)
        self.met.append(met)
        self.ts_us.append(ts)
        self.value.append(v)
        self.quality.append(q)
        self.seq.append(s)
        self.recv_us.append(recv)

    def append(
        self, device: str, metric: str, ts_us: int, value: float, quality: int, seq: int, recv_us: int
    ) -> None:
        if not 0 <= quality <= 255:
            raise ValueError("quality must fit in a byte")
        self.push(
            self.intern_device(device), self.intern_metric(metric), ts_us, value, quality, seq, recv_us
        )

    def begin(self) -> None:
        self._mark_n = len(self.ts_us)
        self._mark_dev = len(self.devices)
        self._mark_met = len(self.metrics)

    def rollback(self) -> None:
        n = self._mark_n
        for col in (self.dev, self.met, self.ts_us, self.value, self.quality, self.seq, self.recv_us):
            del col[n:]
        for name in self.devices[self._mark_dev :]:
            del self._dev_index[name]
        del self.devices[self._mark_dev :]
        for name in self.metrics[self._mark_met :]:
            del self._met_index[name]
        del self.metrics[self._mark_met :]

    def receive_stamped(self, start: int = 0) -> int:
        """Readings from row ``start`` on whose time is their receive time (the payload gave none)."""
        ts, recv = self.ts_us, self.recv_us
        return sum(1 for i in range(start, len(ts)) if ts[i] == recv[i])

    def column(self, name: str) -> list[Any]:
        """One column as a Python list (strings for device and metric)."""
        if name == "device":
            return [self.devices[i] for i in self.dev]
        if name == "metric":
            return [self.metrics[i] for i in self.met]
        if name in ("ts_us", "value", "quality", "seq", "recv_us"):
            return list(getattr(self, name))
        raise KeyError(name)

    def rows(self) -> list[dict[str, Any]]:
        """Readings as dicts (for tools and tests, not the hot path)."""
        return [
            {
                "device": self.devices[self.dev[i]],
                "metric": self.metrics[self.met[i]],
                "ts_us": self.ts_us[i],
                "value": self.value[i],
                "quality": self.quality[i],
                "seq": self.seq[i],
                "recv_us": self.recv_us[i],
            }
            for i in range(len(self.ts_us))
        ]
