"""Fuzz the Influx line protocol decoders: Cython against the twin (see _harness.py for usage).

Input layout: the first byte picks the topic device (none, "dev1"); the rest
is the payload. Outcomes must match exactly: the same rows, or the same error
class, offset and message. The plain loop mutates valid payloads with the
characters the grammar gives meaning to (separators, escapes, quotes, line
ends, suffixes, signs, exponents) and bad UTF-8.
"""

from __future__ import annotations

import random
import sys

import _harness

from sensorhub._ext import lineproto as cy_lineproto
from sensorhub.decoders import lineproto_py

check = _harness.make_check(cy_lineproto.Decoder(), lineproto_py.Decoder(), exact=True)


def one_input(data: bytes) -> None:
    if not data:
        return
    check(data[1:], "dev1" if data[0] & 1 else None)


_SEEDS = [
    b'weather,location=us-midwest,device=d\\ 1 temperature=82,hum=5i,ok=t,s="x\\" y" 1465839830100400200',
    b"# comment\r\nm v=1 5000\r\n\r\nm,device=a\\=b\\,c f\\ \\=k=18446744073709551615u,g=-9223372036854775808i",
    b"my\\ meas,t\\=k=v\\,w x=-1.5e-3,y=.5,z=5.,b=FALSE,c=True -1999\n   m v=2",
    b'm s="a\\\\",v=1e22,w=1234567890123456789012345 9223372036854775807',
    b"cpu,host=a usage=0.1,idle=99.9000000000000000001,n=3u\ncpu,host=b usage=1E+3,t=T",
]
_ALPHABET = b', =\\"\n\r#iu.-+eEtTfF0123456789\xc3\xff\x00'


def plain_input(rng: random.Random) -> bytes:
    return bytes([rng.randrange(2)]) + _harness.mutate(rng, rng.choice(_SEEDS), _ALPHABET)


if __name__ == "__main__":
    sys.exit(_harness.main("ilp", one_input, plain_input))
