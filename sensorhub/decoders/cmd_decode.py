"""``sensorhub decode``: decode one payload and print its readings as JSON lines.

Reads the payload from FILE (or standard input for ``-``, the default) and
decodes it as ``--format`` (``frame``, ``json``, ``ilp`` or ``sparkplug``),
with ``--device`` playing the role of the topic's device and the metric
dictionary taken from the configuration (``Settings.dictionary``).

Each reading is one JSON object per line with the keys ``device``,
``metric``, ``ts_us``, ``value``, ``quality`` and ``seq``. JSON has no NaN
or infinities, so a non-finite ``value`` is printed as the string ``"nan"``,
``"inf"`` or ``"-inf"`` (every line stays valid JSON; a consumer that wants
a float gets it back with ``float(value)``).

An invalid payload prints ``<ErrorClass>: <reason and offset>`` on standard
error and exits with status 2, so scripts can tell bad input (2) from other
failures (1) and configuration errors (78).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from sensorhub.config import load_settings
from sensorhub.decoders import decode_to_rows
from sensorhub.errors import DecodeError

#: exit status for a payload that does not decode
EXIT_INVALID = 2


def json_value(v: float) -> float | str:
    """``v`` as JSON can carry it: finite floats as they are, others as strings."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def format_row(row: dict[str, Any]) -> str:
    """One reading as a JSON line (keys in the documented order)."""
    out = dict(row)
    out["value"] = json_value(float(row["value"]))
    return json.dumps(out, ensure_ascii=False, allow_nan=False)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.file == "-":
        payload = sys.stdin.buffer.read()
    else:
        with open(args.file, "rb") as fh:
            payload = fh.read()
    try:
        rows = decode_to_rows(args.format, payload, args.device, settings.dictionary)
    except DecodeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    out = sys.stdout
    for row in rows:
        out.write(format_row(row) + "\n")
    out.flush()
    return 0
