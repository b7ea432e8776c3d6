"""``python -m firmware_sim``: the same as ``sensorhub-sim``."""

import sys

from firmware_sim.cli import main

sys.exit(main())
