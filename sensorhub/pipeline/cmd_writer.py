"""``sensorhub writer``: Redis Streams into ClickHouse, until SIGTERM."""

from __future__ import annotations

import argparse

from sensorhub.config import load_settings
from sensorhub.metrics import gcstats
from sensorhub.pipeline.writer import Writer
from sensorhub.service.lifecycle import Lifecycle


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    life = Lifecycle("writer")
    life.install_signal_handlers()
    w = Writer(settings, consumer=args.consumer)
    w.stop_event = life.stop
    gcstats.settle()  # start-up is over: what exists now stays out of the collector's way
    try:
        return w.run()
    except InterruptedError:
        return 0
