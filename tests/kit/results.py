"""Writing a benchmark's JSON result: what ran, on what machine, and the numbers."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import psutil

__all__ = ["machine", "write_results"]


def machine() -> dict[str, Any]:
    """CPUs, Python version and the 1-minute load average now (at the end of a run)."""
    return {
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_end": round(psutil.getloadavg()[0], 2),
    }


def write_results(path: Path, benchmark: str, results: Any, **fields: Any) -> None:
    """``{"benchmark", "machine", **fields, "results"}`` to ``path`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": benchmark, "machine": machine(), **fields, "results": results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
