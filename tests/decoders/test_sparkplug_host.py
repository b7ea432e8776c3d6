"""Sparkplug host state machine: births, aliases, seq wrap and gaps, rebirth
requests, deaths with stale bdSeq, device lifecycle; payloads made by the
protobuf runtime from the official schema."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparkplug_schema import load_schema
from twins import IMPLEMENTATIONS, pair

from sensorhub.decoders import batch_py, sparkplug_py
from sensorhub.decoders.sparkplug_host import REBIRTH_METRIC, SparkplugHost
from sensorhub.errors import CountTooLarge, InvalidValue, Truncated, UnknownAlias

TS = 1_764_072_000_000
RECV_NS = 1_764_072_001_000_000_000
INT32, INT64, UINT64, DOUBLE, BOOLEAN = 3, 4, 8, 10, 11


@pytest.fixture(scope="module")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return load_schema(tmp_path_factory.mktemp("pb"))


TWIN = "sensorhub.decoders.sparkplug_py"


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return pair(request.param, TWIN, "sparkplug")


class Node:
    """An edge node as the protobuf runtime encodes it."""

    def __init__(self, pb: ModuleType, group: str = "plant1", edge: str = "press7") -> None:
        self.pb = pb
        self.group = group
        self.edge = edge
        self.seq = 0
        self.bdseq = 0

    def topic(self, kind: str, device: str | None = None) -> str:
        t = f"spBv1.0/{self.group}/{kind}/{self.edge}"
        return t if device is None else f"{t}/{device}"

    def message(self, metrics: list[dict[str, Any]], seq: int | None, ts: int = TS) -> bytes:
        p = self.pb.Payload(timestamp=ts)
        if seq is not None:
            p.seq = seq
        for m in metrics:
            p.metrics.add(**m)
        return p.SerializeToString()  # type: ignore[no-any-return]

    def nbirth(self) -> tuple[str, bytes]:
        self.seq = 0
        metrics = [
            {"name": "bdSeq", "datatype": INT64, "long_value": self.bdseq},
            {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False},
            {"name": "pressure", "alias": 1, "datatype": DOUBLE, "double_value": 3.5},
            {"name": "cycles", "alias": 2, "datatype": INT32, "int_value": 10},
        ]
        return self.topic("NBIRTH"), self.message(metrics, 0)

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def ndata(self, pressure: float, cycles: int, seq: int | None = None) -> tuple[str, bytes]:
        metrics = [
            {"alias": 1, "double_value": pressure},
            {"alias": 2, "int_value": cycles % 2**32},
        ]
        return self.topic("NDATA"), self.message(metrics, self.next_seq() if seq is None else seq)

    def ndeath(self, bdseq: int) -> tuple[str, bytes]:
        return self.topic("NDEATH"), self.message(
            [{"name": "bdSeq", "datatype": INT64, "long_value": bdseq}], None
        )

    def dbirth(self, device: str) -> tuple[str, bytes]:
        metrics = [{"name": "temp", "alias": 10, "datatype": INT32, "int_value": 20}]
        return self.topic("DBIRTH", device), self.message(metrics, self.next_seq())

    def ddata(self, device: str, temp: int) -> tuple[str, bytes]:
        metrics = [{"alias": 10, "int_value": temp % 2**32}]
        return self.topic("DDATA", device), self.message(metrics, self.next_seq())


def host_for(impl: tuple[Any, Any]) -> tuple[SparkplugHost, Any]:
    mod, bmod = impl
    return SparkplugHost("ingest-1", mod.Decoder()), bmod.ReadingBatch()


def send(host: SparkplugHost, batch: Any, msg: tuple[str, bytes], recv_ns: int = RECV_NS) -> int:
    return host.on_message(msg[0], msg[1], recv_ns, batch)


def assert_rebirth_request(pb: ModuleType, out: tuple[str, bytes], node: Node) -> None:
    topic, raw = out
    assert topic == f"spBv1.0/{node.group}/NCMD/{node.edge}"
    p = pb.Payload.FromString(raw)
    assert len(p.metrics) == 1
    m = p.metrics[0]
    assert (m.name, m.datatype, m.WhichOneof("value"), m.boolean_value) == (
        REBIRTH_METRIC,
        BOOLEAN,
        "boolean_value",
        True,
    )
    assert p.timestamp == RECV_NS // 1_000_000


def test_birth_data_by_alias_wrap_gap_and_rebirth(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    node = Node(pb)
    assert send(host, batch, node.nbirth()) == 4  # bdSeq, rebirth flag, pressure, cycles
    assert host.online_nodes == 1
    rows = batch.rows()
    assert {r["metric"]: r["value"] for r in rows} == {
        "bdSeq": 0.0, "Node Control/Rebirth": 0.0, "pressure": 3.5, "cycles": 10.0,
    }  # fmt: skip
    assert {r["device"] for r in rows} == {"plant1/press7"}
    # 300 data messages by alias: seq runs 1..255, wraps to 0 and goes on, no gap
    for k in range(300):
        assert send(host, batch, node.ndata(float(k), -k)) == 2
    assert node.seq == 300 % 256
    assert host.seq_gaps == 0 and host.take_outgoing() == []
    last = batch.rows()[-2:]
    assert [(r["metric"], r["value"]) for r in last] == [("pressure", 299.0), ("cycles", -299.0)]
    assert len(batch) == 4 + 600
    # a gap: seq jumps by 2
    node.next_seq()
    assert send(host, batch, node.ndata(1.0, 1)) == 2  # still stored: the aliases are known
    assert host.seq_gaps == 1 and host.rebirths_requested == 1
    out = host.take_outgoing()
    assert len(out) == 1
    assert_rebirth_request(pb, out[0], node)
    # the host goes on from the seq it saw: the next message in order is no new gap,
    # and a second gap before the rebirth does not ask again
    send(host, batch, node.ndata(2.0, 2))
    assert host.seq_gaps == 1
    node.next_seq()
    send(host, batch, node.ndata(3.0, 3))
    assert host.seq_gaps == 2 and host.rebirths_requested == 1 and host.take_outgoing() == []
    # the rebirth arrives: state is back, a later gap asks again
    send(host, batch, node.nbirth())
    send(host, batch, node.ndata(4.0, 4))
    node.next_seq()
    send(host, batch, node.ndata(5.0, 5))
    assert host.rebirths_requested == 2 and len(host.take_outgoing()) == 1


def test_unanswered_rebirth_request_is_repeated_after_the_retry_time(
    impl: tuple[Any, Any], pb: ModuleType
) -> None:
    mod, bmod = impl
    host = SparkplugHost("h", mod.Decoder(), rebirth_retry_s=10.0)
    batch = bmod.ReadingBatch()
    node = Node(pb)
    send(host, batch, node.nbirth())
    node.next_seq()
    send(host, batch, node.ndata(1.0, 1), recv_ns=RECV_NS)
    node.next_seq()
    send(host, batch, node.ndata(1.0, 1), recv_ns=RECV_NS + 9_000_000_000)
    assert host.seq_gaps == 2 and host.rebirths_requested == 1
    node.next_seq()
    send(host, batch, node.ndata(1.0, 1), recv_ns=RECV_NS + 10_000_000_000)
    assert host.seq_gaps == 3 and host.rebirths_requested == 2
    assert [t for t, _ in host.take_outgoing()] == ["spBv1.0/plant1/NCMD/press7"] * 2


def test_data_before_birth(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    node = Node(pb)
    with pytest.raises(UnknownAlias):
        send(host, batch, node.ndata(1.0, 1))
    assert len(batch) == 0
    assert (
        host.data_before_birth == 1 and host.unknown_aliases == 1 and host.rebirths_requested == 1
    )
    # named data before the birth is still stored
    named = node.message([{"name": "pressure", "double_value": 7.0}], node.next_seq())
    assert host.on_message(node.topic("NDATA"), named, RECV_NS, batch) == 1
    assert host.data_before_birth == 2 and host.rebirths_requested == 1  # asked once
    (out,) = host.take_outgoing()
    assert_rebirth_request(pb, out, node)


def test_ndeath_with_stale_bdseq_is_ignored(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    node = Node(pb)
    node.bdseq = 5
    send(host, batch, node.nbirth())
    assert send(host, batch, node.ndeath(4)) == 0
    assert host.ignored_deaths == 1 and host.online_nodes == 1
    # data still flows in order
    send(host, batch, node.ndata(1.0, 1))
    assert host.seq_gaps == 0
    assert send(host, batch, node.ndeath(5)) == 0
    assert host.online_nodes == 0 and host.deaths == 1
    # a second death (e.g. the will after a clean death) is ignored too
    send(host, batch, node.ndeath(5))
    assert host.ignored_deaths == 2
    # data after the death: before the next birth
    with pytest.raises(UnknownAlias):
        send(host, batch, node.ndata(2.0, 2))
    assert host.data_before_birth == 1


def test_devices(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    node = Node(pb)
    send(host, batch, node.nbirth())
    assert send(host, batch, node.dbirth("sensorA")) == 1
    assert host.online_devices == 1
    assert send(host, batch, node.ddata("sensorA", -3)) == 1
    row = batch.rows()[-1]
    assert (row["device"], row["metric"], row["value"]) == ("plant1/press7/sensorA", "temp", -3.0)
    # DDATA of a device that never had a DBIRTH
    with pytest.raises(UnknownAlias):
        send(host, batch, node.ddata("sensorB", 1))
    assert host.data_before_birth == 1 and host.rebirths_requested == 1
    assert (
        send(host, batch, (node.topic("DDEATH", "sensorA"), node.message([], node.next_seq()))) == 0
    )
    assert host.online_devices == 0 and host.seq_gaps == 0
    with pytest.raises(UnknownAlias):
        send(host, batch, node.ddata("sensorA", 1))


def test_state_messages_and_commands_are_ignored(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    assert host.state_topic == "spBv1.0/STATE/ingest-1"
    assert json.loads(host.birth_state_payload(TS)) == {"online": True, "timestamp": TS}
    assert json.loads(host.death_state_payload(TS + 1)) == {"online": False, "timestamp": TS + 1}
    assert (
        host.on_message("spBv1.0/STATE/other", b'{"online":true,"timestamp":1}', RECV_NS, batch)
        == 0
    )
    assert host.on_message("spBv1.0/g/NCMD/e", b"\x00garbage", RECV_NS, batch) == 0
    assert host.ignored_messages == 2


@pytest.mark.parametrize(
    "topic",
    [
        "spBv2.0/g/NDATA/e",
        "spBv1.0/g/NDATA",
        "spBv1.0/g/NDATA/e/d",
        "spBv1.0/g/DDATA/e",
        "spBv1.0/g/XDATA/e",
        "spBv1.0//NDATA/e",
        "spBv1.0/g/NDATA/e/d/x",
    ],
)
def test_bad_topics(impl: tuple[Any, Any], topic: str) -> None:
    host, batch = host_for(impl)
    with pytest.raises(InvalidValue, match="topic"):
        host.on_message(topic, b"", RECV_NS, batch)


def test_bad_payloads_raise_and_leave_the_batch(impl: tuple[Any, Any], pb: ModuleType) -> None:
    host, batch = host_for(impl)
    node = Node(pb)
    send(host, batch, node.nbirth())
    n = len(batch)
    for kind in ("NBIRTH", "NDATA", "NDEATH"):
        with pytest.raises(Truncated):
            host.on_message(node.topic(kind), b"\x12\x05ab", RECV_NS, batch)
    assert len(batch) == n


def test_bounded_node_count(impl: tuple[Any, Any], pb: ModuleType) -> None:
    mod, bmod = impl
    host = SparkplugHost("h", mod.Decoder(), max_nodes=2)
    batch = bmod.ReadingBatch()
    for k in range(2):
        send(host, batch, Node(pb, edge=f"e{k}").nbirth())
    n = len(batch)
    with pytest.raises(CountTooLarge):
        send(host, batch, Node(pb, edge="e2").nbirth())
    assert len(batch) == n  # nothing of the refused birth is kept


def test_host_id_must_be_a_topic_level() -> None:
    for bad in ("", "a/b", "+", "#"):
        with pytest.raises(InvalidValue):
            SparkplugHost(bad)


# ---------------------------------------------------------------- both implementations, same story

_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["NBIRTH", "NDATA", "NDATA", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH", "skip"]
        ),
        st.integers(0, 2),  # which edge node
        st.integers(-(2**31), 2**31 - 1),  # a value
        st.integers(0, 3),  # bdSeq of a death
    ),
    max_size=40,
)


def _step_message(node: Node, kind: str, value: int, bdseq: int) -> tuple[str, bytes]:
    if kind == "NBIRTH":
        return node.nbirth()
    if kind == "NDATA":
        return node.ndata(value / 7, value)
    if kind == "NDEATH":
        return node.ndeath(bdseq)
    if kind == "DBIRTH":
        return node.dbirth("dev")
    if kind == "DDATA":
        return node.ddata("dev", value)
    return node.topic("DDEATH", "dev"), node.message([], node.next_seq())


def _story(pb: ModuleType, impl: tuple[Any, Any], steps: list[tuple[str, int, int, int]]) -> Any:
    mod, bmod = impl
    host = SparkplugHost("h", mod.Decoder())
    batch = bmod.ReadingBatch()
    nodes = [Node(pb, edge=f"e{k}") for k in range(3)]
    told = []
    for t, (kind, k, value, bdseq) in enumerate(steps):
        node = nodes[k]
        recv = RECV_NS + t * 1_000_000_000
        if kind == "skip":
            node.next_seq()  # a message the host never hears
            continue
        msg = _step_message(node, kind, value, bdseq)
        try:
            told.append(send(host, batch, msg, recv))
        except UnknownAlias as exc:
            told.append(str(exc))
        if kind == "NBIRTH":
            node.bdseq = (node.bdseq + 1) % 4
    return told, batch.rows(), host.counters(), host.take_outgoing()


@settings(max_examples=200, deadline=None)
@given(steps=_STEPS)
def test_cython_and_twin_hosts_tell_the_same_story(
    pb: ModuleType, steps: list[tuple[str, int, int, int]]
) -> None:
    """Random lifecycles of three nodes: both hosts store, count and ask the same."""
    a = _story(pb, pair("cython", TWIN, "sparkplug"), steps)
    b = _story(pb, (sparkplug_py, batch_py), steps)
    assert a == b
