"""The test and benchmark kit: what the tests and benchmarks share, outside the package.

- :mod:`kit.services`: mosquitto, redis-server and chdb-server as child
  processes on free loopback ports, started, signalled and stopped by PID;
- :mod:`kit.encoders`: the test oracle, firmware frames, JSON and Sparkplug B
  payloads and varints written from the specs, independently of
  ``sensorhub.decoders``;
- :mod:`kit.store`: counting rows in ClickHouse and waiting for a count;
- :mod:`kit.results`: a benchmark's JSON result with the machine it ran on.

The tests import it as ``kit`` (``tests/`` is on their path); a benchmark
puts ``tests/`` on ``sys.path`` first. It is not part of the wheel.
"""
