"""Alert rules in the configuration: every bad rule is an error naming the key and the expected form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sensorhub.config import load_settings
from sensorhub.errors import ConfigError

GOOD = """
[[alerts.rules]]
name = "hot"
device = "*"
metric = "temp_c"
above = 80.0
clear_at = 75.0
for_s = 5
severity = "critical"

[[alerts.rules]]
name = "pressure-drop"
metric = "pressure"
rate_below = -0.5
window_s = 10

[[alerts.rules]]
name = "gone"
device = "line1-*"
silent_s = 30
"""


def _load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "sensorhub.toml"
    p.write_text(text)
    return load_settings(p)


def test_rules_load_with_their_conditions(tmp_path: Path) -> None:
    s = _load(tmp_path, GOOD)
    rules = s.alerts.rules  # type: ignore[attr-defined]
    assert [(r.name, r.kind) for r in rules] == [("hot", "above"), ("pressure-drop", "rate_below"), ("gone", "silent_s")]
    assert rules[0].clear_at == 75.0 and rules[0].for_s == 5 and rules[1].severity == "warning"


@pytest.mark.parametrize(
    ("rule", "key", "expected"),
    [
        ('name = "x"\nabove = 1\nbelow = 0', "alerts.rules.0", "exactly one of above, below, rate_above, rate_below, silent_s"),
        ('name = "x"', "alerts.rules.0", "exactly one of above"),
        ('name = "x"\nabove = 80\nclear_at = 85', "alerts.rules.0", "clear_at at or below above (80.0)"),
        ('name = "x"\nbelow = 2\nclear_at = 1', "alerts.rules.0", "clear_at at or above below (2.0)"),
        ('name = "x"\nsilent_s = 5\nfor_s = 3', "alerts.rules.0", "silent_s takes neither clear_at nor for_s"),
        ('name = "x"\nsilent_s = 0', "alerts.rules.0.silent_s", "greater than 0"),
        ('name = "x"\nabove = 1\nseverity = "loud"', "alerts.rules.0.severity", "'info', 'warning' or 'critical'"),
        ('name = "x y"\nabove = 1', "alerts.rules.0.name", "should match pattern"),
        ('name = "x"\nabove = 1\nfor = 3', "alerts.rules.0.for", "no such setting"),
    ],
)
def test_a_bad_rule_names_its_key_and_the_expected_form(tmp_path: Path, rule: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"[[alerts.rules]]\n{rule}\n")
    assert e.value.key.startswith(key + " "), e.value.key
    assert expected in e.value.expected, e.value.expected


def test_rule_names_are_unique(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, '[[alerts.rules]]\nname = "x"\nabove = 1\n[[alerts.rules]]\nname = "x"\nbelow = 0\n')
    assert e.value.key.startswith("alerts.rules ") and "unique" in e.value.expected


def test_serving_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, '[alerts]\nhost = "0.0.0.0"\n')
    assert "alerts.token" in e.value.expected
    s = _load(tmp_path, '[alerts]\nhost = "0.0.0.0"\ntoken = "s3cret"\n')
    assert s.masked()["alerts"]["token"] == "***"  # type: ignore[attr-defined]


def test_the_evaluator_without_rules_is_a_configuration_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.toml"
    p.write_text("")
    out = subprocess.run([sys.executable, "-m", "sensorhub", "--config", str(p), "alerts", "evaluate"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78, out.stderr
    assert "alerts.rules: expected at least one [[alerts.rules]] table" in out.stderr
