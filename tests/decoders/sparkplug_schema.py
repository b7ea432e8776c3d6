"""The official Sparkplug B schema, compiled with protoc for the tests that encode with protobuf."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from sensorhub.decoders import sparkplug_py

PROTO = Path(sparkplug_py.__file__).with_name("sparkplug_b.proto")


def load_schema(out: Path) -> ModuleType:
    """Compile the official sparkplug_b.proto with protoc and import the generated module."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}", str(PROTO)],
        check=True,
    )
    spec = importlib.util.spec_from_file_location("sparkplug_b_pb2", out / "sparkplug_b_pb2.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
