# `make demo`: set up (once) and run the main job on the embedded `shapes` data set.
# `make test`: set up (once) and run the tests.
# The environment is a virtual environment cached outside the clone (see scripts/setup.sh).
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1

.PHONY: setup demo demo-quick demo-emoji test bench
setup:
	@bash scripts/setup.sh

demo:
	@PY=$$(bash scripts/setup.sh) && $$PY train/demo.py

demo-quick:
	@PY=$$(bash scripts/setup.sh) && $$PY train/demo.py preset=quick out=outputs/demo-quick

demo-emoji:
	@PY=$$(bash scripts/setup.sh) && $$PY train/demo.py experiment=emoji

# The tests run one thread each, spread over every core by pytest-xdist (-n auto); --dist loadgroup keeps the tests
# that share accelerate's fixed port (xdist_group) in one worker.
test:
	@PY=$$(bash scripts/setup.sh) && $$PY -m pytest -q -n auto --dist loadgroup $(PYTEST_ARGS)

bench:
	@PY=$$(bash scripts/setup.sh) && for b in bench/*.py; do $$PY $$b; done
