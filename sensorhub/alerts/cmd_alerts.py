"""``sensorhub alerts``: evaluate the rules, serve the alerts over WebSocket, list or forget them.

- ``alerts evaluate``: the evaluator (one per appliance), until SIGTERM;
- ``alerts serve``: the WebSocket gateway and the page, until SIGTERM;
- ``alerts open``: the alerts open now, one JSON object a line;
- ``alerts drop-group``: remove the evaluator's consumer group from the reading
  streams (after removing every rule: an unread group holds back the writer's trim).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from sensorhub.config import load_settings
from sensorhub.metrics import gcstats
from sensorhub.service.lifecycle import Lifecycle

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, int] = {}
    settings = load_settings(args.config)
    if args.action == "evaluate":
        from sensorhub.alerts.evaluator import Evaluator

        life = Lifecycle("alerts evaluate")
        life.install_signal_handlers()
        ev = Evaluator(settings, life)
        gcstats.settle()
        return ev.run(with_store=not args.no_store)
    if args.action == "serve":
        if args.port is not None:
            overrides["port"] = args.port
            settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(update=overrides)})
        return asyncio.run(_serve(settings))
    import redis

    from sensorhub.alerts.keys import AlertKeys
    from sensorhub.pipeline.keys import StreamLayout
    from sensorhub.pipeline.redisconn import redis_client

    layout = StreamLayout(settings.redis.prefix, settings.redis.partitions)
    r = redis_client(settings.redis, socket_timeout=settings.redis.socket_timeout_s)
    if args.action == "open":
        for _aid, raw in r.hscan_iter(AlertKeys(layout).open, count=1000):
            print(raw.decode())
        return 0
    dropped = 0
    for p in range(layout.partitions):
        try:
            dropped += int(r.xgroup_destroy(layout.readings(p), settings.alerts.group))
        except redis.ResponseError:
            pass  # no such stream
    print(json.dumps({"group": settings.alerts.group, "streams": dropped}))
    return 0


async def _serve(settings: object) -> int:
    from sensorhub.alerts.gateway import Gateway
    from sensorhub.config import Settings

    assert isinstance(settings, Settings)
    life = Lifecycle("alerts serve")
    life.install_signal_handlers(asyncio.get_running_loop())
    gw = Gateway(settings, life)
    gcstats.settle()
    return await gw.run()
