# The one way in: `make demo` and `make test` do every set-up step themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The builds these machines install from disk; elsewhere, override with your own (e.g. a CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Each of the test processes trains with one thread: on 2 cores, more threads only fight each other.
export OMP_NUM_THREADS ?= 1

.PHONY: install sysdeps demo test test-fast proto lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# System packages the tests use: docker-compose validates docker-compose.yml (no Docker engine needed).
sysdeps:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "note: docker-compose is not installed; the compose-file test will be skipped"; fi; }

demo: install
	$(BIN)/fl-demo

test: install sysdeps
	$(BIN)/python -m pytest -q

# Unit tests only (no processes started): the quick loop while editing.
test-fast: install
	$(BIN)/python -m pytest -q tests/unit

proto: install
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) runs .pytest_cache
