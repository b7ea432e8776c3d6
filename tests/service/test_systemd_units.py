"""The unit files: systemd-analyze verify and security, the settings the appliance relies on, the examples."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from svc_helpers import REPO

from sensorhub.config import load_settings

UNITS_DIR = REPO / "systemd"
ALERT_SERVICES = ["sensorhub-alerts-evaluator.service", "sensorhub-alerts-gateway.service"]
SERVICES = ["sensorhub-ingest@.service", "sensorhub-writer@.service", "sensorhub-chdb.service", *ALERT_SERVICES]
UNITS = [*SERVICES, "sensorhub.target"]
INSTANCES = ["sensorhub-ingest@mqtt.service", "sensorhub-writer@1.service", "sensorhub-chdb.service",
             *ALERT_SERVICES, "sensorhub.target"]
BINARY = "/opt/sensorhub/.venv/bin/sensorhub"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (scripts/ensure-systemd.sh installs it)"
)


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert m, f"unexpected time span {value!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[m.group(2)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file-system root for ``systemd-analyze --root``: the system's own units, ours, and a stub binary.

    The stub stands in for the installed program, so verify checks our
    ExecStart path without anything installed under /opt.
    """
    r = tmp_path_factory.mktemp("root")
    (r / "usr/lib/systemd").mkdir(parents=True)
    system_units = Path("/usr/lib/systemd/system")
    if system_units.is_dir():
        shutil.copytree(system_units, r / "usr/lib/systemd/system", symlinks=True)
    (r / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(UNITS_DIR / name, r / "etc/systemd/system" / name)
    stub = r / BINARY.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return r


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run(
        [ANALYZE, f"--root={root}", "--man=no", "--generators=no", "verify", *units],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )


@needs_analyze
def test_every_unit_verifies_without_a_warning(root: Path) -> None:
    res = verify(root, *INSTANCES)
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).strip() == ""


@needs_analyze
def test_verify_catches_a_broken_unit(root: Path) -> None:
    """The check above can fail: a typo and a missing binary are reported."""
    broken = root / "etc/systemd/system/sensorhub-broken.service"
    text = (UNITS_DIR / "sensorhub-chdb.service").read_text()
    broken.write_text(text.replace("RestartSec=1s", "RestartSec=1s\nRestartSecs=2").replace(BINARY, "/opt/nowhere/sensorhub"))
    try:
        res = verify(root, "sensorhub-broken.service")
    finally:
        broken.unlink()
    assert "RestartSecs" in res.stderr
    assert res.returncode != 0 and "/opt/nowhere/sensorhub" in res.stderr


def exposure(unit: str) -> float:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNITS_DIR / unit)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, SYSTEMD_COLORS="0"), check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", res.stdout)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_is_low_and_documented(unit: str) -> None:
    score = exposure(unit)
    assert score <= MAX_EXPOSURE
    doc = (REPO / "docs" / "operations.md").read_text()
    row = re.search(rf"^\| `{re.escape(unit)}` \| (\d+\.\d) \|", doc, re.M)
    assert row, f"no security score row for {unit} in docs/operations.md"
    assert float(row.group(1)) == score


@pytest.mark.parametrize("unit", SERVICES)
def test_services_notify_restart_and_stay_independent(unit: str) -> None:
    u = parse_unit(UNITS_DIR / unit)
    assert u["Service.Type"] == ["notify"]
    assert u["Service.NotifyAccess"] == ["main"]
    assert u["Service.Restart"] == ["always"]
    assert seconds(u["Service.RestartSec"][-1]) <= 1.0
    assert 0 < seconds(u["Service.WatchdogSec"][-1]) <= 60
    assert 0 < seconds(u["Service.TimeoutStopSec"][-1]) <= 120
    assert u["Service.RestartPreventExitStatus"] == ["78"]
    burst, interval = int(u["Unit.StartLimitBurst"][0]), seconds(u["Unit.StartLimitIntervalSec"][0])
    # The limit must leave room for restarts every RestartSec across a short outage.
    assert interval / burst >= seconds(u["Service.RestartSec"][-1])
    assert burst >= 10
    # No dependency that lets one unit's failure stop or restart another.
    for key in ("Unit.Requires", "Unit.BindsTo", "Unit.Requisite", "Unit.PropagatesStopTo", "Unit.StopPropagatedFrom"):
        assert key not in u, f"{unit}: {key} couples units"
    assert u.get("Unit.PartOf", ["sensorhub.target"]) == ["sensorhub.target"]
    assert u["Install.WantedBy"] == ["sensorhub.target"]
    assert u["Service.EnvironmentFile"] == ["/etc/sensorhub/sensorhub.env"]
    assert u["Service.ExecStart"][0].startswith(f"{BINARY} --config /etc/sensorhub/sensorhub.toml ")


def test_commands_and_hardening() -> None:
    ingest = parse_unit(UNITS_DIR / "sensorhub-ingest@.service")
    writer = parse_unit(UNITS_DIR / "sensorhub-writer@.service")
    chdb = parse_unit(UNITS_DIR / "sensorhub-chdb.service")
    assert ingest["Service.ExecStart"][0].endswith(" ingest --source %i")
    assert writer["Service.ExecStart"][0].endswith(" writer --consumer writer-%H-%i")
    assert chdb["Service.ExecStart"][0].endswith(
        " chdb-server --host 127.0.0.1 --port 8123 --data /var/lib/sensorhub/chdb --users-file %d/chdb_users")
    assert chdb["Service.StateDirectory"] == ["sensorhub"]
    # secrets as systemd credentials, read from files: never in argv or the environment file
    assert chdb["Service.LoadCredential"] == ["chdb_users:/etc/sensorhub/credentials/chdb-users.json"]
    for u, creds in ((ingest, {"mqtt_user", "mqtt_password", "redis_password"}),
                     (writer, {"redis_password", "clickhouse_password"})):
        assert {c.split(":")[0] for c in u["Service.LoadCredential"]} == creds
        env = " ".join(u["Service.Environment"])
        for c in creds:
            assert f"_FILE=%d/{c}" in env
        assert "PASSWORD=" not in env
    for u in (ingest, writer, chdb):
        for key, value in {
            "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "SystemCallArchitectures": "native",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "IPAddressDeny": "any",
            "IPAddressAllow": "localhost", "PrivateDevices": "yes", "UMask": "0077",
        }.items():
            assert u[f"Service.{key}"] == [value], key
        assert u["Service.SystemCallFilter"][0] == "@system-service"
        assert "Service.MemoryMax" in u
    # W^X: on where Python and our extensions run, off where chdb compiles expressions.
    assert ingest["Service.MemoryDenyWriteExecute"] == writer["Service.MemoryDenyWriteExecute"] == ["yes"]
    assert chdb["Service.MemoryDenyWriteExecute"] == ["no"]


def test_the_alert_units_run_their_commands_hardened_like_the_writer() -> None:
    writer = parse_unit(UNITS_DIR / "sensorhub-writer@.service")
    sandbox = {k: v for k, v in writer.items() if k.startswith("Service.") and k not in (
        "Service.ExecStart", "Service.SyslogIdentifier", "Service.MemoryMax", "Service.TimeoutStopSec",
        "Service.LoadCredential", "Service.Environment")}  # each its own account
    for unit, command in zip(ALERT_SERVICES, (" alerts evaluate", " alerts serve"), strict=True):
        u = parse_unit(UNITS_DIR / unit)
        assert u["Service.ExecStart"][0].endswith(command)
        for key, value in sandbox.items():
            if key not in ("Service.TimeoutStartSec",):
                assert u.get(key) == value, f"{unit}: {key}"


def test_target_pulls_in_nothing_that_could_restart_siblings() -> None:
    t = parse_unit(UNITS_DIR / "sensorhub.target")
    assert t["Install.WantedBy"] == ["multi-user.target"]
    assert not {"Unit.Requires", "Unit.BindsTo", "Unit.PartOf"} & set(t)


def test_ensure_systemd_script_is_a_valid_noop_when_present() -> None:
    script = REPO / "scripts" / "ensure-systemd.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    if ANALYZE is not None:
        assert subprocess.run([str(script)], check=False, timeout=30).returncode == 0


def test_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SENSORHUB_"):
            monkeypatch.delenv(key)
    for raw in (REPO / "etc" / "sensorhub.env.example").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key.startswith("SENSORHUB_"), line
            monkeypatch.setenv(key, value)
    settings = load_settings(REPO / "etc" / "sensorhub.toml.example")
    assert "mqtt" in settings.sources
    assert settings.clickhouse.url == "http://127.0.0.1:8123"
