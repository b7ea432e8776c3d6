"""``sensorhub ingest --source NAME``: one source into Redis Streams, until SIGTERM."""

from __future__ import annotations

import argparse
import logging

from sensorhub.config import SourceSettings, load_settings
from sensorhub.errors import ConfigError
from sensorhub.metrics import gcstats
from sensorhub.pipeline.ingest import Ingest
from sensorhub.service.lifecycle import Lifecycle
from sensorhub.sources import base

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    src_cfg: SourceSettings | None = settings.sources.get(args.source)
    if src_cfg is None:
        # a venue name works on its own: `--source binance` with no [sources.binance]
        if args.source in base.driver_names():
            src_cfg = SourceSettings(driver=args.source)
        else:
            raise ConfigError(
                f"sources.{args.source}", "a configured source or a driver name: " + ", ".join(base.driver_names())
            )
    source = base.create(src_cfg.driver, args.source, settings=settings, source_settings=src_cfg)
    life = Lifecycle(f"ingest {args.source}")
    life.install_signal_handlers()
    ingest = Ingest(settings, source)
    ingest.stop_event = life.stop
    gcstats.settle()  # start-up is over: what exists now stays out of the collector's way
    return ingest.run()
