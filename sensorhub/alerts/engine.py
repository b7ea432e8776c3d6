"""Rule evaluation over reading blocks: per-(rule, device, metric) state and the events it emits.

The engine is deterministic: the same readings in the same order, from the
same state, give the same events at the same *positions*. A position names
the reading that caused an event (stream entry id and row, zero-padded so
that positions compare as strings); the evaluator emits an event only if its
position is past the last one emitted for that series, which is how a
restarted evaluator re-reading entries it had not acknowledged repeats
nothing. Every series lives in one partition (partitions are by device), so
its readings always come in the same order.

Conditions, per rule (see :class:`~sensorhub.config.AlertRule`):

- ``above``/``below``: the reading's value is past the limit. ``for_s``: the
  condition must hold, in reading time (``ts``), that long before the alert
  opens; a reading not past the limit resets it. An open alert closes when the
  value is back at ``clear_at`` (hysteresis; default the limit).
- ``rate_above``/``rate_below``: change per second between a sample and the
  oldest sample kept within ``window_s`` before it, once the samples span at
  least half the window. A series keeps a reading as a sample when
  ``window_s / rate_samples`` has passed since its last one, and the rate is
  evaluated on each new sample (the readings in between cost one comparison).
  Same ``for_s`` and ``clear_at``.
- ``silent_s``: no reading of a matching metric from a matching device, by
  receive time, for that long. Checked by :meth:`Engine.tick` against the
  clock while the evaluator is caught up, and on the next reading (a gap
  longer than ``silent_s`` opens and closes the alert at once when nothing
  opened it live). Only devices seen at least once can be silent.

A value that is not a number (NaN) neither opens nor closes an alert.
A threshold series has state only while its condition holds or its alert is
open, so a rule that matches every reading but rarely fires costs a
comparison per reading and no memory. State is bounded: past ``max_series``
states the longest-unseen ones with no open alert are dropped
(:attr:`Engine.evicted` names them).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sensorhub.config import AlertRule

__all__ = ["Engine", "alert_id", "position", "rule_fingerprint"]

_SILENT = "silent_s"
# readings past these device-time bounds are not stored (pipeline.rejected); nor evaluated
_NO_WINDOW = (1 << 62, 1 << 62)


def position(entry_id: str, row: int, sub: int = 0) -> str:
    """The position of row ``row`` of stream entry ``entry_id`` (``sub`` 1: just after it)."""
    ms, _, seq = entry_id.partition("-")
    return f"{int(ms):015d}-{int(seq or 0):010d}-{row:07d}-{sub}"


def alert_id(rule: str, device: str, metric: str, opened_pos: str) -> str:
    """The id of one alert (its open and its closed event share it): 16 hex digits."""
    h = hashlib.blake2b(f"{rule}\0{device}\0{metric}\0{opened_pos}".encode(), digest_size=8)
    return h.hexdigest()


def rule_fingerprint(rule: AlertRule) -> str:
    """Changes whenever anything about the rule does; a restored state needs the same one."""
    text = json.dumps(rule.model_dump(mode="json"), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _matcher(glob: str) -> Callable[[str], bool]:
    if glob == "*":
        return lambda _s: True
    rx = re.compile(fnmatch.translate(glob))
    return lambda s: rx.match(s) is not None


class _Rule:
    """A rule compiled for evaluation."""

    __slots__ = (
        "clear", "device", "for_us", "fp", "glob", "index", "kind", "limit", "metric", "name", "rising",
        "severity", "silent_us", "spacing_us", "window_us",
    )

    def __init__(self, rule: AlertRule, index: int, rate_samples: int) -> None:
        self.index = index
        self.name = rule.name
        self.kind = rule.kind
        self.severity = rule.severity
        self.fp = rule_fingerprint(rule)
        self.device = _matcher(rule.device)
        self.metric = _matcher(rule.metric)
        self.glob = rule.metric  # a silent alert names its rule's metric glob as the metric
        self.rising = self.kind in ("above", "rate_above")
        self.limit = float(getattr(rule, self.kind))
        self.clear = float(rule.clear_at) if rule.clear_at is not None else self.limit
        self.for_us = int(rule.for_s * 1e6)
        self.window_us = int(rule.window_s * 1e6)
        self.spacing_us = max(1, self.window_us // rate_samples)
        self.silent_us = int(self.limit * 1e6) if self.kind == _SILENT else 0


class _Series:
    """One value rule on one (device, metric)."""

    __slots__ = ("open", "open_value", "opened_pos", "opened_us", "seen", "since", "st", "sv")

    def __init__(self) -> None:
        self.open = False
        self.since: int | None = None  # ts (µs) since which the condition holds, for for_s
        self.opened_us = 0
        self.opened_pos = ""
        self.open_value = 0.0
        self.st: list[int] = []  # rate rules: the samples' ts (µs) and values, oldest first
        self.sv: list[float] = []
        self.seen = 0  # recv (µs) of the last reading: what eviction goes by


class _Silence:
    """One silent_s rule on one device."""

    __slots__ = ("last_eid", "last_recv", "last_row", "last_ts", "open", "open_value", "opened_pos", "opened_us")

    def __init__(self) -> None:
        self.last_recv = 0
        self.last_ts = 0
        self.last_eid = "0-0"  # where the last reading is (its position is formatted only when needed)
        self.last_row = 0
        self.open = False
        self.opened_us = 0
        self.opened_pos = ""
        self.open_value = 0.0


def _s(us: int) -> float:
    return us / 1e6


_NONE = -(1 << 62)  # "no sample", "never heard" in the int64 tables
_Found = list[tuple[int, int, int, dict[str, Any]]]  # (batch row, rule index, order, event)


def _grown(a: np.ndarray[Any, Any], cap: int, fill: Any) -> np.ndarray[Any, Any]:
    out = np.full(cap, fill, a.dtype)
    out[: len(a)] = a
    return out


class _Batch:
    """The columns of a batch of entries, and where each row came from."""

    __slots__ = ("blocks", "dev", "ent", "met", "recv", "starts", "ts", "val")

    def __init__(self, blocks: list[tuple[str, Any]], starts: Any, dev: Any, met: Any, ts: Any, val: Any,
                 recv: Any, ent: Any) -> None:
        self.blocks, self.starts = blocks, starts
        self.dev, self.met, self.ts, self.val, self.recv, self.ent = dev, met, ts, val, recv, ent

    def rows(self, rows: Any) -> Any:
        """(row, device id, metric id, ts, value, recv) of ``rows``, as Python numbers."""
        return zip(rows.tolist(), self.dev[rows].tolist(), self.met[rows].tolist(), self.ts[rows].tolist(),
                   self.val[rows].tolist(), self.recv[rows].tolist(), strict=True)

    def where(self, i: int) -> tuple[str, int]:
        """The entry id and the row within that entry of batch row ``i``."""
        k = int(self.ent[i])
        return self.blocks[k][0], i - int(self.starts[k])


class Engine:
    """Evaluates ``rules`` over reading blocks; at most ``max_series`` states in memory."""

    def __init__(
        self,
        rules: Sequence[AlertRule],
        max_series: int = 100_000,
        rate_samples: int = 16,
        device_time: tuple[int, int] = _NO_WINDOW,
    ) -> None:
        self.rules = [_Rule(r, i, rate_samples) for i, r in enumerate(rules)]
        self.max_series = max_series
        self.rate_samples = rate_samples
        self.max_past_us, self.max_future_us = device_time
        self.series: dict[tuple[int, str, str], _Series] = {}
        self.silences: dict[tuple[int, str], _Silence] = {}
        #: (rule name, device, metric) of states dropped by the bound since the caller last cleared it
        self.evicted: list[tuple[str, str, str]] = []
        self.readings = 0  # evaluated (matched by some rule)
        self.skipped_device_time = 0
        self._devices: dict[str, bool] = {}
        self._by_name = {r.name: r for r in self.rules}
        self._silent_rules = [r for r in self.rules if r.kind == _SILENT]
        self._reset_caches()

    # ---- the columns of a batch, and the caches over them ----
    def _reset_caches(self) -> None:
        """Forget every id and table derived from the states (rebuilt as readings come)."""
        self._dev_ids: dict[str, int] = {}
        self._dev_names: list[str] = []
        self._met_ids: dict[str, int] = {}
        self._met_names: list[str] = []
        self._pid_of: dict[tuple[int, int], int] = {}
        self._pair_dev: list[int] = []
        self._pair_met: list[int] = []
        n = len(self.rules)
        # per rule, per pair id: matches (1/0); thresholds: has state; rates: last sample's ts
        self._match = [np.zeros(0, np.bool_) for _ in range(n)]
        self._active = [np.zeros(0, np.bool_) for _ in range(n)]
        self._last = [np.zeros(0, np.int64) for _ in range(n)]
        # per rule, per device id: silent_s rules' last receive time and open flag
        self._s_last = [np.zeros(0, np.int64) for _ in range(n)]
        self._s_open = [np.zeros(0, np.bool_) for _ in range(n)]
        self._any = np.zeros(0, np.bool_)

    def _dev_id(self, name: str) -> int:
        i = self._dev_ids.get(name)
        if i is None:
            i = self._dev_ids[name] = len(self._dev_names)
            self._dev_names.append(name)
            if self.rules and i >= len(self._s_last[0]):
                cap = max(64, 2 * i)
                self._s_last = [_grown(a, cap, _NONE) for a in self._s_last]
                self._s_open = [_grown(a, cap, False) for a in self._s_open]
            for r in self._silent_rules:
                s = self.silences.get((r.index, name))
                self._s_last[r.index][i] = s.last_recv if s is not None else _NONE
                self._s_open[r.index][i] = s is not None and s.open
        return i

    def _met_id(self, name: str) -> int:
        i = self._met_ids.get(name)
        if i is None:
            i = self._met_ids[name] = len(self._met_names)
            self._met_names.append(name)
        return i

    def _pids(self, dev: np.ndarray[Any, Any], met: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The pair id of each row's (device, metric); new pairs get their tables' entries here."""
        n_met = max(1, len(self._met_names))
        codes = dev * n_met + met
        uniq, inverse = np.unique(codes, return_inverse=True)
        ids = np.empty(len(uniq), np.int64)
        new: list[tuple[int, int, int]] = []
        for k, code in enumerate(uniq.tolist()):
            d, m = divmod(code, n_met)
            pid = self._pid_of.get((d, m))
            if pid is None:
                pid = self._pid_of[(d, m)] = len(self._pair_dev)
                self._pair_dev.append(d)
                self._pair_met.append(m)
                new.append((pid, d, m))
            ids[k] = pid
        if new:
            self._grow(new)
        return ids[inverse]

    def _grow(self, new: list[tuple[int, int, int]]) -> None:
        """Fill the tables' entries of new pair ids (doubling their room when full)."""
        series = self.series
        first, end = new[0][0], new[-1][0] + 1
        if end > len(self._any):
            cap = max(256, 2 * end)
            self._match = [_grown(a, cap, False) for a in self._match]
            self._active = [_grown(a, cap, False) for a in self._active]
            self._last = [_grown(a, cap, _NONE) for a in self._last]
            self._any = _grown(self._any, cap, False)
        for i, r in enumerate(self.rules):
            match, active, last = self._match[i], self._active[i], self._last[i]
            for pid, d, m in new:
                device, metric = self._dev_names[d], self._met_names[m]
                match[pid] = r.device(device) and r.metric(metric)
                st = series.get((i, device, metric))
                active[pid] = st is not None
                last[pid] = st.st[-1] if st is not None and st.st else _NONE
        any_ = self._any
        any_[first:end] = False
        for match in self._match:
            any_[first:end] |= match[first:end]

    def _watched(self, device: str) -> bool:
        """Whether some rule's device glob matches ``device`` (cached)."""
        w = self._devices.get(device)
        if w is None:
            if len(self._devices) >= 4 * self.max_series:
                self._devices.clear()
            w = self._devices[device] = any(r.device(device) for r in self.rules)
        return w

    # ---- evaluation ----
    def process_block(self, entry_id: str, blk: Any) -> list[dict[str, Any]]:
        """Evaluate every reading of one decoded stream entry block; returns the events, in order."""
        return self.process_entries([(entry_id, blk)])

    def process_entries(self, entries: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Evaluate the readings of several entries (of any streams), in order; returns the events.

        The batch is one set of columns: numpy picks the readings some rule has to look
        at (past a limit, of a series with state, due for a rate sample, of a device that
        is or was silent), and only those go through the rules one by one.
        """
        if not self.rules:
            return []
        blocks = [(eid, blk) for eid, blk in entries if len(blk) and any(self._watched(d) for d in blk.devices)]
        if not blocks:
            return []
        if len(self._pid_of) > 4 * self.max_series or len(self._dev_names) > 4 * self.max_series:
            self._reset_caches()  # bounded like the states
        # the blocks' own name indexes, shifted into one table of global ids per batch
        dev_ids: list[int] = []
        met_ids: list[int] = []
        dev_off: list[int] = []
        met_off: list[int] = []
        for _eid, blk in blocks:
            dev_off.append(len(dev_ids))
            met_off.append(len(met_ids))
            dev_ids += [self._dev_id(n) for n in blk.devices]
            met_ids += [self._met_id(n) for n in blk.metrics]
        sizes = [len(b) for _e, b in blocks]
        ent = np.repeat(np.arange(len(blocks)), sizes)
        raw_dev = np.concatenate([np.frombuffer(b.dev, np.uint32) for _e, b in blocks]).astype(np.int64)
        raw_met = np.concatenate([np.frombuffer(b.met, np.uint32) for _e, b in blocks]).astype(np.int64)
        dev = np.array(dev_ids, np.int64)[raw_dev + np.array(dev_off, np.int64)[ent]]
        met = np.array(met_ids, np.int64)[raw_met + np.array(met_off, np.int64)[ent]]
        ts = np.concatenate([np.frombuffer(b.ts_us, np.int64) for _e, b in blocks])
        val = np.concatenate([np.frombuffer(b.value, np.float64) for _e, b in blocks])
        recv = np.concatenate([np.frombuffer(b.recv_us, np.int64) for _e, b in blocks])
        starts = np.cumsum([0, *sizes])
        pid = self._pids(dev, met)
        watched = self._any[pid]
        inside = (ts >= recv - self.max_past_us) & (ts <= recv + self.max_future_us)
        ok = watched & inside
        self.readings += int(np.count_nonzero(ok))
        self.skipped_device_time += int(np.count_nonzero(watched & ~inside))
        batch = _Batch(blocks, starts, dev, met, ts, val, recv, ent)
        found: list[tuple[int, int, int, dict[str, Any]]] = []
        for rule in self.rules:
            m = self._match[rule.index][pid] & ok
            if not m.any():
                continue
            if rule.kind in ("above", "below"):
                rows = self._threshold_rows(rule, pid, m, val)
                self._thresholds(rule, batch, rows, found)
            elif rule.kind == _SILENT:
                self._silent(rule, batch, np.flatnonzero(m), found)
            else:
                due = m & (ts - self._last[rule.index][pid] >= rule.spacing_us) & ~np.isnan(val)
                self._rates(rule, batch, np.flatnonzero(due), found)
        found.sort(key=lambda f: f[:3])
        if len(self.series) + len(self.silences) > self.max_series:
            self._evict()
        return [ev for *_k, ev in found]

    def _threshold_rows(
        self, rule: _Rule, pid: np.ndarray[Any, Any], m: np.ndarray[Any, Any], val: np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any]:
        """Rows the rule must see: of a series with state, or from a reading past the limit on."""
        past = m & ((val > rule.limit) if rule.rising else (val < rule.limit))
        need = m & self._active[rule.index][pid]
        if past.any():
            need |= m & np.isin(pid, pid[past])  # the rest of a series that crosses: it may clear
        return np.flatnonzero(need)

    def _thresholds(self, rule: _Rule, b: _Batch, rows: np.ndarray[Any, Any], found: _Found) -> None:
        series, active = self.series, self._active[rule.index]
        for i, d, m, ts, value, recv in b.rows(rows):
            key = (rule.index, self._dev_names[d], self._met_names[m])
            st = series.get(key)
            if st is None:
                if not ((value > rule.limit) if rule.rising else (value < rule.limit)):
                    continue
                st = series[key] = _Series()
                active[self._pid_of[(d, m)]] = True
            st.seen = recv
            eid, row = b.where(i)
            ev = self._step(rule, st, key, value, ts, recv, eid, row)
            if ev is not None:
                found.append((i, rule.index, len(found), ev))
            if not st.open and st.since is None:
                del series[key]  # nothing to remember
                active[self._pid_of[(d, m)]] = False

    def _rates(self, rule: _Rule, b: _Batch, rows: np.ndarray[Any, Any], found: _Found) -> None:
        series, last = self.series, self._last[rule.index]
        for i, d, m, ts, value, recv in b.rows(rows):
            key = (rule.index, self._dev_names[d], self._met_names[m])
            st = series.get(key)
            if st is None:
                st = series[key] = _Series()
            tl = st.st
            if tl and ts - tl[-1] < rule.spacing_us:
                continue  # a second reading of the series in the batch, too soon for a sample
            st.seen = recv
            lo = ts - rule.window_us
            if tl and tl[0] < lo:
                k = bisect_left(tl, lo)
                del tl[:k]
                del st.sv[:k]
            rate = None
            if tl and ts - tl[0] >= rule.window_us // 2:
                rate = (value - st.sv[0]) * 1e6 / (ts - tl[0])
            tl.append(ts)
            st.sv.append(value)
            last[self._pid_of[(d, m)]] = ts
            if rate is not None:
                eid, row = b.where(i)
                ev = self._step(rule, st, key, rate, ts, recv, eid, row)
                if ev is not None:
                    found.append((i, rule.index, len(found), ev))

    def _silent(self, rule: _Rule, b: _Batch, rows: np.ndarray[Any, Any], found: _Found) -> None:
        """Keep each device's last reading; a device that is or was silent goes row by row."""
        ri = rule.index
        s_last, s_open = self._s_last[ri], self._s_open[ri]
        d = b.dev[rows]
        order = np.argsort(d, kind="stable")
        ds, rs, rows_s = d[order], b.recv[rows][order], rows[order]
        first = np.empty(len(ds), np.bool_)
        first[0] = True
        first[1:] = ds[1:] != ds[:-1]
        prev = np.where(first, s_last[ds], np.roll(rs, 1))
        gap = rs - prev
        slow_rows = s_open[ds] | ((prev != _NONE) & ((gap > rule.silent_us) | (gap < 0)))
        slow = set(ds[slow_rows].tolist())
        last_of = np.empty(len(ds), np.bool_)
        last_of[-1] = True
        last_of[:-1] = ds[1:] != ds[:-1]
        for dv, i in zip(ds[last_of].tolist(), rows_s[last_of].tolist(), strict=True):
            if dv in slow:
                continue
            device = self._dev_names[dv]
            s = self.silences.get((ri, device))
            if s is None:
                s = self.silences[(ri, device)] = _Silence()
            s.last_recv, s.last_ts = int(b.recv[i]), int(b.ts[i])
            s.last_eid, s.last_row = b.where(i)
            s_last[dv] = s.last_recv
        if not slow:
            return
        for i, dv, _m, ts, _value, recv in b.rows(np.sort(rows_s[np.isin(ds, list(slow))])):
            device = self._dev_names[dv]
            s = self.silences.get((ri, device))
            eid, row = b.where(i)
            if s is None:
                s = self.silences[(ri, device)] = _Silence()
            elif recv > s.last_recv and (s.open or recv - s.last_recv > rule.silent_us):
                events: list[dict[str, Any]] = []
                self._heard(rule, device, s, ts, recv, eid, row, events)
                found.extend((i, ri, len(found) + k, ev) for k, ev in enumerate(events))
            if recv >= s.last_recv:
                s.last_recv, s.last_ts, s.last_eid, s.last_row = recv, ts, eid, row
            s_last[dv] = s.last_recv
            s_open[dv] = s.open

    def _step(
        self, rule: _Rule, st: _Series, key: tuple[int, str, str], x: float, ts: int, recv: int, entry_id: str,
        row: int,
    ) -> dict[str, Any] | None:
        """One value ``x`` (the reading's, or a rate) through the rule's open/close logic."""
        if x != x:  # NaN
            return None
        device, metric = key[1], key[2]
        if not st.open:
            if (x > rule.limit) if rule.rising else (x < rule.limit):
                if st.since is None:
                    st.since = ts
                if ts - st.since >= rule.for_us:
                    st.open = True
                    st.since = None
                    st.opened_us = ts
                    st.opened_pos = position(entry_id, row)
                    st.open_value = x
                    return self._event(rule, device, metric, "open", x, rule.limit, ts, recv,
                                       st.opened_pos, st.opened_pos, ts, None, x)
            else:
                st.since = None
            return None
        if (x <= rule.clear) if rule.rising else (x >= rule.clear):
            st.open = False
            return self._event(rule, device, metric, "closed", x, rule.clear, ts, recv,
                               position(entry_id, row), st.opened_pos, st.opened_us, ts, st.open_value)
        return None

    def _heard(
        self, rule: _Rule, device: str, s: _Silence, ts: int, recv: int, entry_id: str, row: int,
        events: list[dict[str, Any]],
    ) -> None:
        """A reading from a device that is silent, or was for longer than the rule allows."""
        gap = recv - s.last_recv
        if not s.open:
            # silent longer than the rule allows, and nobody saw it live (the evaluator
            # was behind or down): the alert opened and closes now
            events.append(self._silent_open(rule, device, s, _s(gap)))
        s.open = False
        events.append(self._event(rule, device, rule.glob, "closed", _s(gap), _s(rule.silent_us), ts, recv,
                                  position(entry_id, row), s.opened_pos, s.opened_us, recv, s.open_value))

    def _silent_open(self, rule: _Rule, device: str, s: _Silence, silent_for_s: float) -> dict[str, Any]:
        pos = position(s.last_eid, s.last_row, 1)  # just after the last reading
        s.open = True
        d = self._dev_ids.get(device)
        if d is not None:
            self._s_open[rule.index][d] = True
        s.opened_us = s.last_recv + rule.silent_us
        s.opened_pos = pos
        s.open_value = silent_for_s
        return self._event(rule, device, rule.glob, "open", silent_for_s, _s(rule.silent_us),
                           s.last_ts, s.last_recv, pos, pos, s.opened_us, None, silent_for_s)

    def tick(self, now_us: int) -> list[dict[str, Any]]:
        """Open the silent_s alerts of devices not heard from for longer than their rule allows."""
        events: list[dict[str, Any]] = []
        rules = self.rules
        for (ri, device), s in self.silences.items():
            if s.open:
                continue
            rule = rules[ri]
            if now_us - s.last_recv > rule.silent_us:
                events.append(self._silent_open(rule, device, s, _s(now_us - s.last_recv)))
        return events

    def _event(
        self, rule: _Rule, device: str, metric: str, state: str, value: float, limit: float, ts_us: int,
        recv_us: int, pos: str, opened_pos: str, opened_us: int, closed_us: int | None, open_value: float,
    ) -> dict[str, Any]:
        return {
            "id": alert_id(rule.name, device, metric, opened_pos),
            "rule": rule.name,
            "kind": rule.kind,
            "device": device,
            "metric": metric,
            "state": state,
            "severity": rule.severity,
            "value": value,
            "threshold": limit,  # the level this event crossed: the limit, or clear_at when it closes
            "limit": rule.limit if rule.kind != _SILENT else _s(rule.silent_us),
            "open_value": open_value,
            "ts": _s(ts_us),
            "recv": _s(recv_us),
            "opened": _s(opened_us),
            "closed": _s(closed_us) if closed_us is not None else None,
            "pos": pos,
        }

    # ---- bounds ----
    def _evict(self) -> None:
        """Drop the longest-unseen states without an open alert, down to 90 % of the bound."""
        target = int(self.max_series * 0.9)
        excess = len(self.series) + len(self.silences) - target
        candidates: list[tuple[int, int, Any]] = [
            (st.seen, 0, k) for k, st in self.series.items() if not st.open
        ] + [(s.last_recv, 1, k) for k, s in self.silences.items() if not s.open]
        candidates.sort(key=lambda c: c[0])
        for _seen, which, k in candidates[: max(0, excess)]:
            rule = self.rules[k[0]]
            if which == 0:
                del self.series[k]
                self.evicted.append((rule.name, k[1], k[2]))
            else:
                del self.silences[k]
                self.evicted.append((rule.name, k[1], rule.glob))
        self._reset_caches()

    # ---- open alerts, checkpoint ----
    def open_alerts(self) -> dict[str, tuple[str, str, str]]:
        """Alert id -> (rule, device, metric) of every alert open in this engine."""
        out: dict[str, tuple[str, str, str]] = {}
        for (ri, device, metric), st in self.series.items():
            if st.open:
                name = self.rules[ri].name
                out[alert_id(name, device, metric, st.opened_pos)] = (name, device, metric)
        for (ri, device), s in self.silences.items():
            if s.open:
                rule = self.rules[ri]
                out[alert_id(rule.name, device, rule.glob, s.opened_pos)] = (rule.name, device, rule.glob)
        return out

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data (lists, numbers, strings) for the checkpoint."""
        rules = self.rules
        series = [
            [rules[ri].name, d, m, st.open, st.since, st.opened_us, st.opened_pos, st.open_value, st.seen, st.st, st.sv]
            for (ri, d, m), st in self.series.items()
        ]
        silences = [
            [rules[ri].name, d, s.last_recv, s.last_ts, s.last_eid, s.last_row, s.open, s.opened_us, s.opened_pos,
             s.open_value]
            for (ri, d), s in self.silences.items()
        ]
        return {"v": 1, "rules": {r.name: r.fp for r in rules}, "series": series, "silences": silences}

    def restore(self, snap: dict[str, Any]) -> int:
        """Load a :meth:`snapshot`; states of rules that are gone or changed are left out. Returns states loaded."""
        if not snap or snap.get("v") != 1:
            return 0
        fps = snap.get("rules") or {}
        keep = {name: r for name, r in self._by_name.items() if fps.get(name) == r.fp}
        n = 0
        for name, d, m, is_open, since, opened_us, opened_pos, open_value, seen, ts_l, v_l in snap.get("series", []):
            rule = keep.get(name)
            if rule is None:
                continue
            st = _Series()
            st.open, st.since, st.opened_us, st.opened_pos = bool(is_open), since, int(opened_us), str(opened_pos)
            st.open_value, st.seen = float(open_value), int(seen)
            st.st, st.sv = [int(t) for t in ts_l], [float(v) for v in v_l]
            self.series[(rule.index, d, m)] = st
            n += 1
        for name, d, last_recv, last_ts, last_eid, last_row, is_open, opened_us, opened_pos, open_value in snap.get(
            "silences", []
        ):
            rule = keep.get(name)
            if rule is None:
                continue
            s = _Silence()
            s.last_recv, s.last_ts, s.last_eid, s.last_row = int(last_recv), int(last_ts), str(last_eid), int(last_row)
            s.open, s.opened_us, s.opened_pos, s.open_value = bool(is_open), int(opened_us), str(opened_pos), float(
                open_value)
            self.silences[(rule.index, d)] = s
            n += 1
        self._reset_caches()
        return n
