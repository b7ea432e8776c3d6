"""Exchange WebSocket sources: one module per venue, each registered as a source driver.

Importing this package registers every venue below under its name (the
``driver`` of a ``[sources.<name>]`` table). The shared machinery is in
:mod:`sensorhub.sources.exchanges.base`; ``docs/exchanges.md`` says how to add a venue.
"""

from __future__ import annotations

from sensorhub.sources.exchanges import (
    binance,
    bitfinex,
    bitstamp,
    bybit,
    coinbase,
    gateio,
    gemini,
    htx,
    kraken,
    kucoin,
    okx,
)
from sensorhub.sources.exchanges.base import VENUES, ExchangeSource, Venue, register_venue

__all__ = ["VENUES", "ExchangeSource", "Venue", "register_venue", "venue_modules"]

#: The venue modules shipped here, by registry name.
venue_modules = {
    m.VENUE.name: m for m in (binance, bitfinex, bitstamp, bybit, coinbase, gateio, gemini, htx, kraken, kucoin, okx)
}
