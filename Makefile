# The two commands of the README:
#   make demo   set up, prepare real data with the real model, train dpo/sampo/tie_dpo, compare them
#   make test   set up and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-float demo docs wheelhouse

setup:
	bash launch/setup_env.sh $(VENV)

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that run the real 135M model or the deepspeed launcher.
test-fast: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The tests that compare floats computed along different paths (marker float_sensitive, not slow), again
# with 1 and with 2 torch threads (DPO_ZOO_TEST_THREADS, read in tests/conftest.py): a test that relies
# on bit-identical floats across batch shapes or kernels then fails here, on any machine.
FLOAT_THREADS ?= 1 2
test-float: setup
	for threads in $(FLOAT_THREADS); do \
		DPO_ZOO_TEST_THREADS=$$threads DS_ACCELERATOR=cpu $(PY) -m pytest -m "float_sensitive and not slow" $(PYTEST_ARGS) || exit 1; \
	done

demo: setup
	bash launch/demo.sh

docs: setup
	$(PY) -m dpo_zoo.docs

# ./wheelhouse: the wheels bench/gpu_check.sh installs on a GPU machine without network (never torch);
# WHEELHOUSE_PYTHONS="3.10 3.12" collects the compiled wheels for that machine's Python instead of this one's.
WHEELHOUSE_PYTHONS ?=
wheelhouse: setup
	$(PY) launch/wheelhouse.py $(foreach v,$(WHEELHOUSE_PYTHONS),--python-version $(v))
