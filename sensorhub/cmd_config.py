"""``sensorhub config check``: print the effective configuration or the first bad key."""

from __future__ import annotations

import argparse
import json

from sensorhub.config import load_settings


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0
