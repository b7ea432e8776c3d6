"""Fuzz the JSON payload decoders: Cython against the twin (see _harness.py for usage).

Input layout: the first byte picks the topic device (none, "dev1"); the rest
is the payload. The plain loop mutates valid payloads of all three shapes
with JSON's structural characters, digits, escapes and bad UTF-8.
"""

from __future__ import annotations

import random
import sys

import _harness
from kit.encoders import RawNumber, encode_json

from sensorhub._ext import jsonpayload as cy_json
from sensorhub.decoders import jsonpayload_py

check = _harness.make_check(cy_json.Decoder(), jsonpayload_py.Decoder(), exact=False)


def one_input(data: bytes) -> None:
    if not data:
        return
    check(data[1:], "dev1" if data[0] & 1 else None)


def _seed(i: int) -> bytes:
    rng = random.Random(i)
    one = {"metric": "temp_c", "value": rng.uniform(-1e3, 1e3), "ts": RawNumber("1764072000.123456"), "seq": i, "quality": i % 3}
    two = {"ts": "2025-11-25T12:00:00.5+01:00", "device": "dev1", "values": {"a": 1, "b\u00e9": True, "c": -2.5e-3}}
    return encode_json([one, two, {"x": [None, {"y": "\\"}]} | one] if i % 3 == 0 else (one if i % 3 == 1 else two), rng)


_SEEDS = [_seed(i) for i in range(64)]
_ALPHABET = b' \t\n{}[]",:-+.0123456789eEtrufalsn\\/u\x00\x1f\xc3\xa9\xed\xa0\xff'


def plain_input(rng: random.Random) -> bytes:
    return bytes([rng.randrange(2)]) + _harness.mutate(rng, rng.choice(_SEEDS), _ALPHABET)


if __name__ == "__main__":
    sys.exit(_harness.main("json", one_input, plain_input))
