# The two commands of the README:
#   make demo   set up, prepare real data with the real model, train dpo/sampo/tie_dpo, compare them
#   make test   set up and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo docs

setup:
	bash launch/setup_env.sh $(VENV)

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that run the real 135M model or the deepspeed launcher.
test-fast: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	bash launch/demo.sh

docs: setup
	$(PY) -m dpo_zoo.docs
