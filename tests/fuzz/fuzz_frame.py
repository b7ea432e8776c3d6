"""Fuzz the firmware frame decoders: Cython against the twin (see _harness.py for usage).

Input layout: the first byte picks how the rest becomes a payload: as is; as
the tail of a frame header ("SH" version 1); or with a correct CRC-32
appended, so that inputs reach the field rules checked after the CRC. The
second byte picks the topic device (none, the frame's own, another).
"""

from __future__ import annotations

import random
import struct
import sys
import zlib

import _harness
from kit.encoders import random_frame

from sensorhub._ext import frame as cy_frame
from sensorhub.decoders import frame_py

NAMES = {1: "temp_c", 2: "rh"}
check = _harness.make_check(cy_frame.Decoder(NAMES), frame_py.Decoder(NAMES), exact=True)


def payload_of(data: bytes) -> tuple[bytes, str | None]:
    if len(data) < 2:
        return data, None
    mode, t, rest = data[0] % 3, data[1] % 3, data[2:]
    if mode == 1:
        rest = b"SH\x01" + rest
    elif mode == 2:
        rest = rest + struct.pack("<I", zlib.crc32(rest))
    topic = None
    if t == 1 and len(rest) > 5:
        topic = rest[5 : 5 + rest[4]].decode("ascii", "replace")
    elif t == 2:
        topic = "press-01"
    return rest, topic


def one_input(data: bytes) -> None:
    payload, topic = payload_of(data)
    check(payload, topic)


_SEEDS = [random_frame(random.Random(i), max_count=4).encode() for i in range(64)]


def plain_input(rng: random.Random) -> bytes:
    seed = rng.choice(_SEEDS)
    mode = rng.randrange(3)
    body = _harness.mutate(rng, seed[:-4] if mode == 2 else seed, b"\x00\x01\x02\x03\x7f\x80\xffSH")
    return bytes([mode, rng.randrange(3)]) + (body[3:] if mode == 1 else body)


if __name__ == "__main__":
    sys.exit(_harness.main("frame", one_input, plain_input))
