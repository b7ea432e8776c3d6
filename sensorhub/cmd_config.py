"""``sensorhub config check``: print the effective configuration or the first bad key."""

from __future__ import annotations

import argparse
import json

from sensorhub.config import load_settings

HELP = "check the configuration and print it (secrets masked)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check"], help="check: validate and print the effective config")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0
