"""The evaluator across a kill -9, the writer's trim against the alert group, and the stack's JSON."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import clickhouse_connect
import pytest
from alertkit import T0, AlertStack
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from sensorhub.pipeline.keys import StreamLayout

RULES = """
[alerts]
checkpoint_ms = 5000   # a wide window of evaluated, unacknowledged entries to kill it in

[[alerts.rules]]
name = "flip"
device = "rs-*"
metric = "v"
above = 50.0

[[alerts.rules]]
name = "marker"
metric = "marker"
above = 0.5
severity = "info"
"""


def test_a_killed_evaluator_neither_misses_nor_repeats_an_event(stack_factory: Any, wait_for: Any) -> None:
    stack = stack_factory(RULES)
    a = AlertStack(stack.info)
    n_messages, per_message = 80, 20
    # every reading crosses: 60 opens, 40 closes, 60 opens again ...
    readings = [("v", 60.0 if i % 2 == 0 else 40.0, T0 + i * 0.01) for i in range(n_messages * per_message)]
    seen: list[dict[str, Any]] = []
    with contextlib.ExitStack() as ctx:
        ws = ctx.enter_context(connect(a.alerts_url + "?device=rs-*", open_timeout=10, additional_headers=a.ws_headers))

        def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                for msg in ws:
                    seen.append(json.loads(msg))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        killed: list[int] = []

        def publish() -> None:
            for k in range(n_messages):
                a.publish("rs-1", readings[k * per_message : (k + 1) * per_message])
                if k == n_messages // 2:
                    killed.append(stack.signal("alerts-evaluator", signal.SIGKILL))
                time.sleep(0.03)

        pub = threading.Thread(target=publish)
        pub.start()
        pub.join(120)
        stack.wait_restarted("alerts-evaluator", killed[0], timeout=60)
        a.mark("rs-1", timeout=120)
        expected = [("open" if i % 2 == 0 else "closed", round(ts, 6)) for i, (_m, _v, ts) in enumerate(readings)]
        events = a.events("rs-1")
        assert [(e["state"], round(e["ts"], 6)) for e in events] == expected
        # the gateway sent each once too
        wait_for(lambda: len([m for m in seen if m.get("rule") == "flip"]) >= len(expected), what="every event over WebSocket")
        assert [(m["state"], round(m["ts"], 6)) for m in seen if m.get("rule") == "flip"] == expected
        ws.close()
        reader.join(10)
    # the restarted evaluator did re-read entries it had evaluated before the kill, and emitted none again
    snap = a.metrics("alerts")
    assert snap["pid"] != killed[0]
    assert snap["counters"].get("entries_replayed", 0) > 0
    assert snap["counters"].get("events_repeated", 0) > 0
    counts = {k.decode(): int(v) for k, v in a.redis.hgetall(a.keys.counts).items()}
    assert counts["opened:warning"] == len(expected) // 2 and counts["closed:warning"] == len(expected) // 2
    assert counts["open:warning"] == 0 and a.redis.hlen(a.keys.open) == 0
    ch = clickhouse_connect.get_client(dsn=stack.clickhouse_url)
    try:
        flip = "FROM alerts WHERE rule = 'flip'"
        wait_for(lambda: int(ch.command(f"SELECT count() {flip} AND state = 'closed'")) >= len(expected) // 2,
                 what="every alert stored", timeout=60)
        assert int(ch.command("SELECT count() FROM alerts FINAL WHERE rule = 'flip'")) == len(expected) // 2
        assert int(ch.command(f"SELECT uniqExact(id, state) {flip}")) == int(ch.command(f"SELECT count() {flip}"))
    finally:
        ch.close()
    a.close()


TRIM_RULES = """
[[alerts.rules]]
name = "hot"
device = "trim-*"
metric = "temp_c"
above = 80.0
"""


def test_the_writer_trims_nothing_the_alert_group_has_not_acknowledged(stack_factory: Any, wait_for: Any) -> None:
    stack = stack_factory(TRIM_RULES)
    a = AlertStack(stack.info)
    r = a.redis
    stream = StreamLayout().readings(StreamLayout().partition("trim-1"))
    ch = clickhouse_connect.get_client(dsn=stack.clickhouse_url)
    pid = stack.pid("alerts-evaluator")
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(30):
            a.publish("trim-1", [("temp_c", 20.0 + i * 3, T0 + i)])  # the last ones cross 80
        wait_for(lambda: int(ch.command("SELECT count() FROM readings WHERE device = 'trim-1'")) == 30,
                 what="the readings stored")
        stored_at = time.time()

        def writer_beat() -> float:
            snaps = [json.loads(r.hget(k, "state") or b"{}") for k in r.scan_iter("sh:metrics:writer:*")]
            return max((float(s.get("heartbeat", 0)) for s in snaps), default=0.0)

        # the writer trims once a second: let it run through a few trims after the insert
        wait_for(lambda: writer_beat() > stored_at + 3, what="the writer's next trims")
        groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)}
        assert groups["writers"]["pending"] == 0 and groups["writers"]["lag"] == 0  # all stored, all acked
        held = groups["alerts"]["pending"] + (groups["alerts"]["lag"] or 0)
        assert held >= 1
        assert r.xlen(stream) >= held  # what the stopped evaluator has not acknowledged is still there
    finally:
        os.kill(pid, signal.SIGCONT)
    # it evaluates them now: nothing was trimmed from under it
    opened = wait_for(lambda: a.events("trim-1"), what="the alert from the entries kept")
    assert [(e["state"], e["value"]) for e in opened] == [("open", 83.0)]
    # and once it acknowledged them (its checkpoint), the writer trims the stream
    wait_for(lambda: r.xlen(stream) == 0, what="the stream trimmed", timeout=60)
    ch.close()
    a.close()


def test_stack_json_gains_alerts_url_and_keeps_every_key(stack_factory: Any) -> None:
    plain = stack_factory()
    with_rules = stack_factory(TRIM_RULES)
    assert "alerts_url" not in plain.info
    assert not {"alerts-evaluator", "alerts-gateway"} & set(plain.info["pids"])
    assert set(plain.info) | {"alerts_url", "alerts_token"} == set(with_rules.info)
    assert {"alerts-evaluator", "alerts-gateway"} <= set(with_rules.info["pids"])
    url = with_rules.info["alerts_url"]
    assert url.startswith("ws://127.0.0.1:") and url.endswith("/alerts")
    with pytest.raises(InvalidStatus):  # the gateway of a secured stack wants its token
        connect(url, open_timeout=10).close()
    with connect(url, open_timeout=10, additional_headers={"Authorization": f"Bearer {with_rules.info['alerts_token']}"}) as ws:
        ws.send(json.dumps({"severity": "critical"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "filter"
    status = with_rules.status()
    assert status["alerts_url"] == url
