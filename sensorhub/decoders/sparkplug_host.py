"""Sparkplug B host application state (Eclipse Sparkplug 3.0) for the ingest loop.

:class:`SparkplugHost` follows every edge node and device it hears of on
``spBv1.0/<group>/<type>/<edge_node>[/<device>]``:

- NBIRTH: records the node's metric names, aliases and datatypes and its
  ``bdSeq``, resets its devices, and stores the birth's metrics as readings.
- DBIRTH: the same for one device of the node.
- NDATA/DDATA: readings; metrics may carry only aliases, named through the
  birth. An alias no birth defined means the host's state is lost: counted
  (``unknown_aliases``), a rebirth is asked for and the payload raises
  :class:`~sensorhub.errors.UnknownAlias` (the ingest loop dead-letters it).
- NDEATH: the node and its devices go offline, but only when the death's
  ``bdSeq`` matches the current birth's; a stale or missing one is ignored
  (``ignored_deaths``).
- DDEATH: the device goes offline.
- ``seq``: every message of a node after its NBIRTH (DBIRTH, DDEATH, NDATA,
  DDATA) carries the next ``seq`` of 0..255, wrapping after 255. A gap
  (``seq_gaps``) or a message before the node's birth (``data_before_birth``)
  means state may be lost: the host queues one NCMD ``Node Control/Rebirth`` =
  true for the node, and another only when no NBIRTH came within
  ``rebirth_retry_s`` (the command may be lost), and goes on from the seq it saw.
  Data that arrives before its birth is still stored when its metrics carry
  their names (see :class:`sensorhub.decoders.sparkplug_py.Decoder`).
- NCMD, DCMD and STATE messages (other applications') are ignored.

Readings' device is ``<group>/<edge_node>`` or ``<group>/<edge_node>/<device>``.
``is_historical`` metrics are stored like any other. The host publishes
:attr:`SparkplugHost.state_topic` with :meth:`birth_state_payload` (retained,
after connecting) and :meth:`death_state_payload` (its will), and NCMDs from
:meth:`take_outgoing`; the connection itself is the source's business.

Births and deaths (rare) are read by ``sparkplug_py.parse_payload``; the
readings of every message go through the decoder given (Cython or twin).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sensorhub import _impl
from sensorhub.decoders import sparkplug_py
from sensorhub.errors import CountTooLarge, InvalidValue, UnknownAlias
from sensorhub.varint import uvarint

__all__ = ["NAMESPACE", "REBIRTH_METRIC", "SparkplugHost", "encode_rebirth"]

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
_BOOLEAN = 11
_MESSAGE_TYPES = frozenset(
    ("NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD")
)


@dataclass
class _Tables:
    aliases: dict[int, tuple[str, int]] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    online: bool = False


@dataclass
class _Node:
    tables: _Tables = field(default_factory=_Tables)
    bdseq: int | None = None
    next_seq: int | None = None
    rebirth_pending: bool = False
    rebirth_at_ns: int = 0
    devices: dict[str, _Tables] = field(default_factory=dict)


# ---- a small protobuf encoder for the one message the host sends (NCMD rebirth)


def _key(fno: int, wt: int) -> bytes:
    return uvarint(fno << 3 | wt)


def encode_rebirth(ts_ms: int) -> bytes:
    """Sparkplug payload of an NCMD asking for a rebirth: ``Node Control/Rebirth`` = true."""
    name = REBIRTH_METRIC.encode()
    metric = (
        _key(1, 2) + uvarint(len(name)) + name  # name
        + _key(3, 0) + uvarint(ts_ms)  # timestamp
        + _key(4, 0) + uvarint(_BOOLEAN)  # datatype
        + _key(14, 0) + b"\x01"  # boolean_value
    )  # fmt: skip
    return _key(1, 0) + uvarint(ts_ms) + _key(2, 2) + uvarint(len(metric)) + metric


def _bdseq(payload: sparkplug_py.Payload) -> int | None:
    """The ``bdSeq`` metric's value of a birth or death, None when it has none."""
    for m in payload.metrics:
        if m.name == b"bdSeq" and m.value_field in (
            sparkplug_py.INT_VALUE,
            sparkplug_py.LONG_VALUE,
        ):
            return int(m.value)
    return None


class SparkplugHost:
    """State of a Sparkplug host application: births, aliases, seq, deaths, rebirths.

    ``decoder`` is a Sparkplug ``Decoder`` (the process's implementation by
    default); batches given to :meth:`on_message` must be of the same
    implementation. At most ``max_nodes`` edge nodes and ``max_devices``
    devices per node are followed; more is :class:`CountTooLarge`. A rebirth
    request unanswered for ``rebirth_retry_s`` (receive time) is sent again.
    """

    def __init__(
        self,
        host_id: str,
        decoder: Any = None,
        *,
        max_nodes: int = 10_000,
        max_devices: int = 1_000,
        max_outgoing: int = 10_000,
        rebirth_retry_s: float = 30.0,
    ) -> None:
        if not host_id or "/" in host_id or "+" in host_id or "#" in host_id:
            raise InvalidValue(f"host id {host_id!r} must be a non-empty topic level")
        self.host_id = host_id
        self.decoder = (
            decoder
            if decoder is not None
            else _impl.load("sparkplug", "sensorhub.decoders.sparkplug_py").Decoder()
        )
        self.max_nodes = max_nodes
        self.max_devices = max_devices
        self.rebirth_retry_ns = int(rebirth_retry_s * 1e9)
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._outgoing: deque[tuple[str, bytes]] = deque(maxlen=max_outgoing)
        self.seq_gaps = 0
        self.rebirths_requested = 0
        self.data_before_birth = 0
        self.ignored_deaths = 0
        self.unknown_aliases = 0
        self.births = 0
        self.deaths = 0
        self.ignored_messages = 0

    # ---- STATE (Sparkplug 3.0: JSON, retained, published by the host itself)

    @property
    def state_topic(self) -> str:
        """``spBv1.0/STATE/<host_id>``."""
        return f"{NAMESPACE}/STATE/{self.host_id}"

    @staticmethod
    def birth_state_payload(ts_ms: int) -> bytes:
        """The retained STATE message saying the host is online."""
        return json.dumps({"online": True, "timestamp": ts_ms}, separators=(",", ":")).encode()

    @staticmethod
    def death_state_payload(ts_ms: int) -> bytes:
        """The STATE will (and last message) saying the host is offline."""
        return json.dumps({"online": False, "timestamp": ts_ms}, separators=(",", ":")).encode()

    # ---- counters

    @property
    def online_nodes(self) -> int:
        """Edge nodes whose last lifecycle message was a birth."""
        return sum(1 for n in self._nodes.values() if n.tables.online)

    @property
    def online_devices(self) -> int:
        """Devices whose last lifecycle message was a birth (of a node online)."""
        return sum(
            1
            for n in self._nodes.values()
            if n.tables.online
            for d in n.devices.values()
            if d.online
        )

    def counters(self) -> dict[str, int]:
        """All counters by name (for the metrics registry)."""
        return {
            "births": self.births,
            "deaths": self.deaths,
            "seq_gaps": self.seq_gaps,
            "data_before_birth": self.data_before_birth,
            "unknown_aliases": self.unknown_aliases,
            "rebirths_requested": self.rebirths_requested,
            "ignored_deaths": self.ignored_deaths,
            "ignored_messages": self.ignored_messages,
            "online_nodes": self.online_nodes,
            "online_devices": self.online_devices,
        }

    def take_outgoing(self) -> list[tuple[str, bytes]]:
        """(topic, payload) messages to publish (rebirth NCMDs), oldest first; empties the queue."""
        out = list(self._outgoing)
        self._outgoing.clear()
        return out

    # ---- messages

    def on_message(self, topic: str, payload: bytes, recv_ns: int, batch: Any) -> int:
        """Handle one message of the Sparkplug namespace; return the readings appended to ``batch``.

        Raises a :class:`~sensorhub.errors.DecodeError` subclass for a topic or
        payload that does not decode; state changes made before the error
        (seq, rebirth requests) stand.
        """
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != NAMESPACE:
            raise InvalidValue(f"topic {topic!r} is not in the {NAMESPACE} namespace")
        if parts[1] == "STATE":
            self.ignored_messages += 1
            return 0
        if len(parts) not in (4, 5) or not all(parts[1:]):
            raise InvalidValue(
                f"topic {topic!r} is not {NAMESPACE}/<group>/<type>/<edge_node>[/<device>]"
            )
        group, kind, edge = parts[1], parts[2], parts[3]
        device_id = parts[4] if len(parts) == 5 else None
        if kind not in _MESSAGE_TYPES:
            raise InvalidValue(f"topic {topic!r}: unknown message type {kind!r}")
        if (device_id is None) != (kind[0] == "N"):
            raise InvalidValue(
                f"topic {topic!r}: {kind} {'needs' if kind[0] == 'D' else 'takes no'} device level"
            )
        if kind in ("NCMD", "DCMD"):
            self.ignored_messages += 1
            return 0
        node_key = (group, edge)
        node_device = f"{group}/{edge}"
        if kind == "NBIRTH":
            return self._nbirth(node_key, node_device, payload, recv_ns, batch)
        if kind == "NDEATH":
            return self._ndeath(node_key, payload)
        node = self._nodes.get(node_key)
        ts_seq = self.decoder.header(payload)  # validates the payload's own fields
        self._check_seq(node_key, node, ts_seq[1], recv_ns)
        node = self._nodes.get(node_key)
        assert device_id is not None or kind == "NDATA"
        if kind == "NDATA":
            tables = node.tables if node is not None and node.tables.online else None
            return self._data(node_key, tables, node_device, payload, recv_ns, batch)
        assert device_id is not None
        dev_name = f"{node_device}/{device_id}"
        if kind == "DBIRTH":
            return self._dbirth(node_key, device_id, dev_name, payload, recv_ns, batch)
        if kind == "DDEATH":
            if node is not None and device_id in node.devices:
                node.devices[device_id].online = False
            self.deaths += 1
            return 0
        # DDATA
        dtables = None
        if node is not None and node.tables.online:
            dtables = node.devices.get(device_id)
            if dtables is not None and not dtables.online:
                dtables = None
            if dtables is None:
                # a device's data before its DBIRTH: the node must rebirth
                self.data_before_birth += 1
                self._request_rebirth(node_key, recv_ns)
        return self._data(node_key, dtables, dev_name, payload, recv_ns, batch)

    # ---- handlers

    def _node(self, key: tuple[str, str]) -> _Node:
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= self.max_nodes:
                raise CountTooLarge(f"more than {self.max_nodes} Sparkplug edge nodes")
            node = self._nodes[key] = _Node()
        return node

    def _request_rebirth(self, key: tuple[str, str], recv_ns: int) -> None:
        node = self._node(key)
        if node.rebirth_pending and recv_ns - node.rebirth_at_ns < self.rebirth_retry_ns:
            return
        node.rebirth_pending = True
        node.rebirth_at_ns = recv_ns
        self.rebirths_requested += 1
        group, edge = key
        self._outgoing.append(
            (f"{NAMESPACE}/{group}/NCMD/{edge}", encode_rebirth(recv_ns // 1_000_000))
        )

    def _check_seq(
        self, key: tuple[str, str], node: _Node | None, seq: int | None, recv_ns: int
    ) -> None:
        if node is None or not node.tables.online:
            self.data_before_birth += 1
            self._request_rebirth(key, recv_ns)
            return
        if seq is None or seq != node.next_seq:
            self.seq_gaps += 1
            self._request_rebirth(key, recv_ns)
        # go on from what was seen, so one gap is counted once
        node.next_seq = None if seq is None else (seq + 1) % 256

    @staticmethod
    def _tables(payload: sparkplug_py.Payload) -> _Tables:
        t = _Tables(online=True)
        for m in payload.metrics:
            if m.name is None:
                continue
            try:
                name = m.name.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidValue("metric name is not valid UTF-8", m.name_offset) from None
            dt = m.datatype or 0
            t.types[name] = dt
            if m.alias is not None:
                t.aliases[m.alias] = (name, dt)
        return t

    def _nbirth(
        self, key: tuple[str, str], device: str, payload: bytes, recv_ns: int, batch: Any
    ) -> int:
        # everything that can fail comes before the readings are appended
        node = self._node(key)
        parsed = sparkplug_py.parse_payload(payload)
        tables = self._tables(parsed)
        n = self.decoder.decode_with(device, payload, recv_ns, batch, tables.aliases, tables.types)
        node.tables = tables
        node.bdseq = _bdseq(parsed)
        node.next_seq = None if parsed.seq is None else (parsed.seq + 1) % 256
        node.rebirth_pending = False
        node.devices.clear()  # devices announce themselves again after a node birth
        self.births += 1
        return int(n)

    def _dbirth(
        self,
        key: tuple[str, str],
        device_id: str,
        device: str,
        payload: bytes,
        recv_ns: int,
        batch: Any,
    ) -> int:
        node = self._nodes.get(key)
        if (
            node is not None
            and node.tables.online
            and device_id not in node.devices
            and len(node.devices) >= self.max_devices
        ):
            raise CountTooLarge(f"more than {self.max_devices} devices on Sparkplug node {key}")
        parsed = sparkplug_py.parse_payload(payload)
        tables = self._tables(parsed)
        n = self.decoder.decode_with(device, payload, recv_ns, batch, tables.aliases, tables.types)
        if node is not None and node.tables.online:
            node.devices[device_id] = tables
        self.births += 1
        return int(n)

    def _ndeath(self, key: tuple[str, str], payload: bytes) -> int:
        parsed = sparkplug_py.parse_payload(payload)
        node = self._nodes.get(key)
        bdseq = _bdseq(parsed)
        if node is None or not node.tables.online or bdseq is None or bdseq != node.bdseq:
            self.ignored_deaths += 1
            return 0
        node.tables.online = False
        node.next_seq = None
        for d in node.devices.values():
            d.online = False
        self.deaths += 1
        return 0

    def _data(
        self,
        key: tuple[str, str],
        tables: _Tables | None,
        device: str,
        payload: bytes,
        recv_ns: int,
        batch: Any,
    ) -> int:
        try:
            n = self.decoder.decode_with(
                device,
                payload,
                recv_ns,
                batch,
                tables.aliases if tables is not None else None,
                tables.types if tables is not None else None,
            )
        except UnknownAlias:
            self.unknown_aliases += 1
            self._request_rebirth(key, recv_ns)
            raise
        return int(n)
