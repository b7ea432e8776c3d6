"""Exchange WebSocket sources: one module per venue, each registered as a source driver.

Importing this package registers every venue below under its name (the
``driver`` of a ``[sources.<name>]`` table). The shared machinery is in three
modules, each depending only on the ones before it:
:mod:`~sensorhub.sources.exchanges.parsing` (timestamps, symbols, JSON framing),
:mod:`~sensorhub.sources.exchanges.venue` (the venue parse framework) and
:mod:`~sensorhub.sources.exchanges.connection` (the WebSocket connection loop,
the :class:`ExchangeSource`). Venue modules use the first two only.
``docs/exchanges.md`` says how to add a venue.
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
from sensorhub.sources.exchanges.connection import ExchangeSource
from sensorhub.sources.exchanges.venue import VENUES, Venue, register_venue

__all__ = ["VENUES", "ExchangeSource", "Venue", "register_venue", "venue_modules"]

#: The venue modules shipped here, by registry name.
venue_modules = {
    m.VENUE.name: m for m in (binance, bitfinex, bitstamp, bybit, coinbase, gateio, gemini, htx, kraken, kucoin, okx)
}
