"""What a module loads when imported: the seams that keep a process from paying for another's imports.

Each check runs in a fresh interpreter and looks at ``sys.modules``; it asserts
what is loaded, never how long it took (that is ``python -X importtime``'s job).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODEC = ("sensorhub._ext.entrycodec", "sensorhub.pipeline.entrycodec_py")


def _loaded(code: str, watched: tuple[str, ...], pure: bool = False) -> list[str]:
    """Which of ``watched`` (packages count with their submodules) ``code`` leaves in ``sys.modules``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(w for w in {list(watched)!r} "
        "if any(m == w or m.startswith(w + '.') for m in sys.modules))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SENSORHUB_PURE_PYTHON"}
    if pure:
        env["SENSORHUB_PURE_PYTHON"] = "1"
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    found: list[str] = json.loads(p.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("pure", [False, True], ids=["cython", "python"])
def test_the_monitor_and_the_metrics_read_key_names_without_the_entry_codec(pure: bool) -> None:
    code = "import sensorhub.monitor.state, sensorhub.metrics.snapshot, sensorhub.pipeline.keys"
    assert _loaded(code, CODEC, pure) == []
    # the probe sees the codec when it is loaded, in either implementation
    assert (CODEC[1] if pure else CODEC[0]) in _loaded("import sensorhub.pipeline.streams", CODEC, pure)


# ---- the command line: arguments without implementations ----

#: what an ingest restart must not pay for: other commands' dependencies
NOT_FOR_INGEST = ("rich", "websockets", "prometheus_client", "chdb", "sensorhub.chdb_server")


def test_the_parser_imports_no_command() -> None:
    from sensorhub.commands import COMMANDS

    argv = {"audit": [], "chdb-server": ["--data", "d"], "ingest": ["--source", "mqtt"], "monitor": [],
            "stack": ["up", "--dir", "d"]}
    code = "from sensorhub import cli\np = cli.build_parser()\n" + "".join(
        f"p.parse_args({[name, *a]!r})\n" for name, a in argv.items())
    watched = (*sorted({c.module for c in COMMANDS.values()}), *NOT_FOR_INGEST, "redis", "pydantic")
    assert _loaded(code, watched) == []


def test_an_mqtt_ingest_imports_only_what_it_runs() -> None:
    # the ingest's whole start-up path short of connecting: arguments, the command's
    # module, its source driver and the ingest loop, as `sensorhub ingest --source mqtt` runs them
    code = (
        "from sensorhub import cli\n"
        "from sensorhub.config import load_settings\n"
        "from sensorhub.sources import base\n"
        "from sensorhub.pipeline.ingest import Ingest\n"
        "args = cli.build_parser().parse_args(['ingest', '--source', 'mqtt'])\n"
        "run = cli.implementation(args.command)\n"
        "s = load_settings(None)\n"
        "Ingest(s, base.create('mqtt', 'mqtt', settings=s, source_settings=s.sources['mqtt']))\n"
    )
    watched = (*NOT_FOR_INGEST, "sensorhub.sources.exchanges", "sensorhub.pipeline.writer", "sensorhub.monitor")
    assert _loaded(code, watched) == []
    # and the probe does see them where they belong
    assert _loaded("import sensorhub.metrics.prometheus, sensorhub.monitor.view", NOT_FOR_INGEST) == [
        "prometheus_client", "rich"]


def test_every_command_runs_from_the_module_the_table_names() -> None:
    import importlib

    from sensorhub.cli import implementation
    from sensorhub.commands import COMMANDS

    for name, cmd in COMMANDS.items():
        assert callable(implementation(name)), name
        mod = importlib.import_module(cmd.module)
        # the arguments and help are declared once, in sensorhub.commands
        assert not hasattr(mod, "add_arguments") and not hasattr(mod, "HELP"), name


def test_the_tables_defaults_are_the_implementations() -> None:
    from dataclasses import fields

    from sensorhub.chdb_server.server import ServerConfig
    from sensorhub.cli import build_parser
    from sensorhub.commands import COMMANDS
    from sensorhub.decoders import FORMATS

    parser = build_parser()
    args = parser.parse_args(["chdb-server", "--data", "d"])
    flag = {"idle_timeout_s": "idle_timeout", "lock_timeout_s": "lock_timeout"}
    defaults = ServerConfig()
    compared = 0
    for f in fields(ServerConfig):
        name = flag.get(f.name, f.name)
        if f.name not in ("data_dir", "password") and hasattr(args, name):
            assert getattr(args, name) == getattr(defaults, f.name), f.name
            compared += 1
    assert compared >= 9
    decode = argparse.ArgumentParser()
    COMMANDS["decode"].arguments(decode)
    assert "{" + ",".join(sorted(FORMATS)) + "}" in decode.format_usage()
