"""The test and benchmark kit: what the tests and benchmarks share, outside the package.

- :mod:`kit.services`: mosquitto, redis-server and chdb-server as child
  processes on free loopback ports, started, signalled and stopped by PID.

The tests import it as ``kit`` (``tests/`` is on their path); a benchmark
puts ``tests/`` on ``sys.path`` first. It is not part of the wheel.
"""
