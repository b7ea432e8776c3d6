"""MQTT topic matching of the routes, checked against paho-mqtt's own matcher and the spec's examples."""

from __future__ import annotations

import ast
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorhub.sources.mqtt.routing import topic_matches

SPEC_EXAMPLES = [
    # MQTT 5 section 4.7.1 and 4.7.2
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/uptime", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/uptime", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("sensors/+/+/json", "sensors/l1/d1/json", True),
    ("sensors/+/+/json", "sensors/l1/d1/frame", False),
]


@pytest.mark.parametrize(("flt", "topic", "want"), SPEC_EXAMPLES)
def test_spec_examples(flt: str, topic: str, want: bool) -> None:
    assert topic_matches(flt, topic) is want


_level = st.sampled_from(["a", "b", "", "$x", "sensors", "d1"])
_topic = st.lists(_level, min_size=1, max_size=5).map("/".join)
_filter = st.lists(st.sampled_from(["a", "b", "", "+", "$x", "sensors"]), min_size=1, max_size=5).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"]), "#"])
)


@settings(max_examples=2000, deadline=None)
@given(_filter, _topic)
def test_same_answer_as_paho(flt: str, topic: str) -> None:
    assert topic_matches(flt, topic) == paho.topic_matches_sub(flt, topic), (flt, topic)


def test_routing_and_native_driver_do_not_import_paho() -> None:
    """Topic matching is MQTT's own: the routing and the native driver import no MQTT client library
    (paho serves only the paho driver and the Sparkplug host's own connection)."""
    root = Path(__file__).resolve().parents[2] / "sensorhub" / "sources" / "mqtt"
    for name in ("routing.py", "native.py"):
        tree = ast.parse((root / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("paho", "aiomqtt")}, (name, imported)
        assert "sensorhub.sources.mqtt.paho" not in imported, name
