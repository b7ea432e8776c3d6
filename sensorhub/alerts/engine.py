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
- ``rate_above``/``rate_below``: change per second between the reading and
  the oldest sample kept within ``window_s`` before it (at most
  ``rate_samples`` samples, evenly spaced, per series), once the samples span
  at least half the window. Same ``for_s`` and ``clear_at``.
- ``silent_s``: no reading of a matching metric from a matching device, by
  receive time, for that long. Checked by :meth:`Engine.tick` against the
  clock while the evaluator is caught up, and on the next reading (a gap
  longer than ``silent_s`` opens and closes the alert at once when nothing
  opened it live). Only devices seen at least once can be silent.

A value that is not a number (NaN) neither opens nor closes an alert.
State is bounded: past ``max_series`` states the longest-unseen ones with no
open alert are dropped (:attr:`Engine.evicted` names them).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

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

    __slots__ = ("open", "open_value", "opened_pos", "opened_us", "samples", "seen", "since")

    def __init__(self) -> None:
        self.open = False
        self.since: int | None = None  # ts (µs) since which the condition holds, for for_s
        self.opened_us = 0
        self.opened_pos = ""
        self.open_value = 0.0
        self.samples: deque[tuple[int, float]] | None = None  # rate rules: (ts µs, value)
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


class Engine:
    """Evaluates ``rules`` over reading blocks; at most ``max_series`` states in memory."""

    def __init__(
        self,
        rules: Sequence[AlertRule],
        max_series: int = 100_000,
        rate_samples: int = 64,
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
        self._pairs: dict[tuple[str, str], tuple[tuple[_Rule, ...], tuple[_Rule, ...]]] = {}
        self._devices: dict[str, bool] = {}
        self._value_rules = [r for r in self.rules if r.kind != _SILENT]
        self._silent_rules = [r for r in self.rules if r.kind == _SILENT]
        self._by_name = {r.name: r for r in self.rules}

    # ---- matching ----
    def _match(self, device: str, metric: str) -> tuple[tuple[_Rule, ...], tuple[_Rule, ...]]:
        key = (device, metric)
        m = self._pairs.get(key)
        if m is None:
            if len(self._pairs) >= 4 * self.max_series:  # a cache, bounded like the states
                self._pairs.clear()
            m = (
                tuple(r for r in self._value_rules if r.device(device) and r.metric(metric)),
                tuple(r for r in self._silent_rules if r.device(device) and r.metric(metric)),
            )
            self._pairs[key] = m
        return m

    def process_block(self, entry_id: str, blk: Any) -> list[dict[str, Any]]:
        """Evaluate every reading of one decoded stream entry block; returns the events, in order."""
        if not self.rules or not len(blk):
            return []
        devices, metrics = blk.devices, blk.metrics
        if not any(self._watched(d) for d in devices):
            return []
        n_met = len(metrics)
        pairs: dict[int, tuple[tuple[_Rule, ...], tuple[_Rule, ...]]] = {}
        events: list[dict[str, Any]] = []
        past, future = self.max_past_us, self.max_future_us
        row = -1
        for d, m, ts, value, recv in zip(blk.dev, blk.met, blk.ts_us, blk.value, blk.recv_us, strict=True):
            row += 1
            code = d * n_met + m
            t = pairs.get(code)
            if t is None:
                t = pairs[code] = self._match(devices[d], metrics[m])
            value_rules, silent_rules = t
            if not value_rules and not silent_rules:
                continue
            if ts < recv - past or ts > recv + future:
                self.skipped_device_time += 1
                continue
            self.readings += 1
            device, metric = devices[d], metrics[m]
            for rule in value_rules:
                ev = self._value(rule, device, metric, ts, value, recv, entry_id, row)
                if ev is not None:
                    events.append(ev)
            for rule in silent_rules:
                self._heard(rule, device, ts, recv, entry_id, row, events)
        if len(self.series) + len(self.silences) > self.max_series:
            self._evict()
        return events

    def _watched(self, device: str) -> bool:
        """Whether some rule's device glob matches ``device`` (cached)."""
        w = self._devices.get(device)
        if w is None:
            if len(self._devices) >= 4 * self.max_series:
                self._devices.clear()
            w = self._devices[device] = any(r.device(device) for r in self.rules)
        return w

    def _value(
        self, rule: _Rule, device: str, metric: str, ts: int, value: float, recv: int, entry_id: str, row: int
    ) -> dict[str, Any] | None:
        key = (rule.index, device, metric)
        st = self.series.get(key)
        if st is None:
            st = self.series[key] = _Series()
        st.seen = recv
        if rule.kind in ("rate_above", "rate_below"):
            x = self._rate(rule, st, ts, value)
            if x is None:
                return None
        else:
            x = value
        if x != x:  # NaN
            return None
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

    def _rate(self, rule: _Rule, st: _Series, ts: int, value: float) -> float | None:
        """Change per second from the oldest sample within the window; keeps the samples."""
        if value != value:
            return None
        q = st.samples
        if q is None:
            q = st.samples = deque(maxlen=self.rate_samples + 1)
        if q and ts <= q[-1][0]:
            return None  # out of order or the same instant: no rate from it
        lo = ts - rule.window_us
        while q and q[0][0] < lo:
            q.popleft()
        rate = None
        if q and ts - q[0][0] >= rule.window_us // 2:
            t0, v0 = q[0]
            rate = (value - v0) * 1e6 / (ts - t0)
        if not q or ts - q[-1][0] >= rule.spacing_us:
            q.append((ts, value))
        return rate

    def _heard(
        self, rule: _Rule, device: str, ts: int, recv: int, entry_id: str, row: int, events: list[dict[str, Any]]
    ) -> None:
        key = (rule.index, device)
        s = self.silences.get(key)
        if s is None:
            s = self.silences[key] = _Silence()
        elif recv > s.last_recv:
            gap = recv - s.last_recv
            if not s.open and gap > rule.silent_us:
                # silent longer than the rule allows, and nobody saw it live (the evaluator
                # was behind or down): the alert opened and closes now
                events.append(self._silent_open(rule, device, s, _s(gap)))
            if s.open:
                s.open = False
                events.append(self._event(rule, device, rule.glob, "closed", _s(gap), _s(rule.silent_us), ts,
                                          recv, position(entry_id, row), s.opened_pos, s.opened_us, recv,
                                          s.open_value))
        if recv >= s.last_recv:
            s.last_recv, s.last_ts, s.last_eid, s.last_row = recv, ts, entry_id, row

    def _silent_open(self, rule: _Rule, device: str, s: _Silence, silent_for_s: float) -> dict[str, Any]:
        pos = position(s.last_eid, s.last_row, 1)  # just after the last reading
        s.open = True
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
            [rules[ri].name, d, m, st.open, st.since, st.opened_us, st.opened_pos, st.open_value, st.seen,
             [t for t, _ in st.samples] if st.samples else [], [v for _, v in st.samples] if st.samples else []]
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
            if ts_l:
                st.samples = deque(zip((int(t) for t in ts_l), (float(v) for v in v_l), strict=True),
                                   maxlen=self.rate_samples + 1)
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
        return n

    def forget(self, keys: Iterable[tuple[str, str, str]]) -> None:
        """Drop the states of these (rule, device, metric) series (their alert was closed from outside)."""
        for name, d, m in keys:
            rule = self._by_name.get(name)
            if rule is None:
                continue
            if rule.kind == _SILENT:
                self.silences.pop((rule.index, d), None)
            else:
                self.series.pop((rule.index, d, m), None)
