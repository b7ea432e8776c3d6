"""sensorhub: sensor readings and market trades into ClickHouse, no loss, no duplicates.

``IMPLEMENTATION`` is ``"cython"`` when the compiled codecs are loaded and
``"python"`` when their pure-Python twins are (``SENSORHUB_PURE_PYTHON=1``).
"""

from __future__ import annotations

from sensorhub._impl import IMPLEMENTATION
from sensorhub.errors import (
    ConfigError,
    DecodeError,
    SensorhubError,
    SinkError,
    SourceError,
    StreamError,
)

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATION",
    "ConfigError",
    "DecodeError",
    "SensorhubError",
    "SinkError",
    "SourceError",
    "StreamError",
    "__version__",
]
