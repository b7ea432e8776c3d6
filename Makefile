# sensorhub: two commands on a fresh Debian 12 + Python 3.11 machine, as root.
#   make demo   set up, run the pipeline at 40k readings/s with the monitor, print a summary
#   make test   set up, run ruff, mypy and the whole default test suite

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := run
DEMO_RATE ?= 40000
DEMO_SECONDS ?= 60
DEMO_DEVICES ?= 200
DEMO_FORMAT ?= frame
DEMO_PER_MESSAGE ?= 10
PYTEST_ARGS ?=

.PHONY: all setup system-packages venv build test lint typecheck fuzz bench bench-docs soak demo demo-exchanges faults wheel clean

all: setup

setup: system-packages build

# mosquitto and redis-server from Debian, only when missing.
system-packages:
	@bash scripts/ensure-system-packages.sh
	@sh scripts/ensure-systemd.sh

$(VENV)/.installed: pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 (Debian: apt-get install -y python3.11 python3.11-venv python3-dev)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	@# the editable install has just built the extensions in place from these sources
	touch $@ $(VENV)/.built

venv: $(VENV)/.installed

# Cython extensions, built in place (sensorhub/_ext/*.so), again only when their sources change
EXT_SOURCES := $(wildcard cython_ext/*.pyx cython_ext/*.pxd cython_ext/*.pxi cython_ext/*.h) setup.py
$(VENV)/.built: $(VENV)/.installed $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(VENV)/.built
	@$(PY) -c "import sensorhub; assert sensorhub.IMPLEMENTATION == 'cython', sensorhub.IMPLEMENTATION; print('sensorhub', sensorhub.__version__, 'implementation', sensorhub.IMPLEMENTATION)"

lint: venv
	$(VENV)/bin/ruff check sensorhub firmware_sim tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

test: setup lint typecheck
	@bash scripts/ensure-system-packages.sh test
	$(PY) -m pytest $(PYTEST_ARGS)

fuzz: setup
	@$(PY) -m pip install --quiet atheris || echo "atheris not installable here: the harnesses run their bounded plain random loop"
	@for f in tests/fuzz/fuzz_*.py; do echo "== $$f"; $(PY) $$f --seconds $${FUZZ_SECONDS:-60} || exit 1; done

# soak.py has its own target (make soak): it runs for minutes
BENCHMARKS := $(filter-out benchmarks/docs_tables.py benchmarks/soak.py,$(wildcard benchmarks/*.py))

bench: setup
	@mkdir -p benchmarks/results
	@for b in $(BENCHMARKS); do echo "== $$b"; $(PY) $$b || exit 1; done

# The tables of docs/performance.md and docs/reliability.md, rendered again from benchmarks/results/
bench-docs: venv
	$(PY) benchmarks/docs_tables.py

# Sustained latency: MINUTES at RATE readings/s in frames of PER_MESSAGE (10 minutes at 40k in
# frames of 10), the box's reference measured before and after, the writer and the chdb-server
# profiled with py-spy for PROFILE_S seconds mid-run. JSON and PNG: benchmarks/results/soak-*
MINUTES ?= 10
RATE ?= 40000
PER_MESSAGE ?= 10
PROFILE_S ?= 30
soak: setup
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/soak.py --rate $(RATE) --per-message $(PER_MESSAGE) --seconds $$(( $(MINUTES) * 60 )) \
	  --profile-s $(PROFILE_S)

faults: setup
	SENSORHUB_FAULT_RATE=40000 SENSORHUB_FAULT_SECONDS=60 SENSORHUB_FAULT_OVERLOAD=1 SENSORHUB_FAULT_DISK_FULL=1 \
	  SENSORHUB_FAULT_REDIS_FAILOVER=1 \
	  SENSORHUB_FAULT_RESULTS=benchmarks/results/faults-40k $(PY) -m pytest tests/fault tests/cluster/test_cluster_failover.py tests/cluster/test_cluster_stack.py -v $(PYTEST_ARGS)

demo: setup
	@DEMO_RATE=$(DEMO_RATE) DEMO_SECONDS=$(DEMO_SECONDS) DEMO_DEVICES=$(DEMO_DEVICES) \
	  DEMO_FORMAT=$(DEMO_FORMAT) DEMO_PER_MESSAGE=$(DEMO_PER_MESSAGE) \
	  bash scripts/demo.sh $(RUN)/demo

demo-exchanges: setup
	bash scripts/demo-exchanges.sh $(RUN)/demo-exchanges

wheel: venv
	$(PY) -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV)/.built build dist *.egg-info sensorhub/_ext/*.so sensorhub/_ext/*.pyi cython_ext/*.c $(RUN)
