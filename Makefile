# The one way in: `make demo` and `make test` do every set-up step themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The builds these machines install from disk; elsewhere, override with your own (e.g. a CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Each of the test processes trains with one thread: on 2 cores, more threads only fight each other.
export OMP_NUM_THREADS ?= 1

.PHONY: install sysdeps demo test test-fast test-cluster bench bench-peers proto lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

# System packages the tests use: docker-compose validates docker-compose.yml (no Docker engine needed);
# iproute2 (`ip netns`) gives the network-namespace test its separate hosts.
SYSTEM_PACKAGES := docker-compose:docker-compose ip:iproute2
sysdeps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: not installed:$$missing; the tests that need them will be skipped"; fi; fi

demo: install
	$(BIN)/fl-demo

# Lint first: ruff over the whole tree (rules: [tool.ruff.lint] in pyproject.toml), then mypy over the
# packages [tool.mypy] lists. The modules in its [[tool.mypy.overrides]] are not type-clean yet and are
# read for their types only: widen the check by fixing one and deleting it from that list.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint sysdeps
	$(BIN)/python -m pytest -q --durations=25

# The performance benchmark: every figure as a ratio measured in this one run, with its target
# (bench/results.json, bench/results.md; docs/performance.md explains them), then the learning studies
# (tests marked `study`, such as MNIST to 95%), which are too slow for `make test`. About 6 minutes.
bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m pytest -q -m study

# fedgrpc against Flower's legacy gRPC runtime (start_server / start_client) on the same workloads in one run
# (bench/peers.py; bench/peers.json, bench/peers.md; docs/performance.md). Flower lives in a virtualenv of its
# own, bench/.peers-venv (its grpcio and protobuf are its own), made here on first use. About 15 minutes.
PEERS_VENV := bench/.peers-venv
PEERS_STAMP := $(PEERS_VENV)/.installed
FLOWER_SPEC ?= flwr==1.42.*
PEERS_TORCH ?= $(firstword $(TORCH_SPEC))

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet '$(FLOWER_SPEC)' $(PEERS_TORCH) numpy
	touch $(PEERS_STAMP)

bench-peers: install $(PEERS_STAMP)
	$(BIN)/python -m bench.peers

# The slow tests left out of `make test`: a two-node Ray cluster on this machine, one node killed
# mid-round (tests/integration/test_ray_cluster.py; about a minute).
test-cluster: install
	$(BIN)/python -m pytest -q -m slow

# Unit tests only (no processes started): the quick loop while editing.
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

proto: install
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache
