# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# GPU users override the torch spec, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyunlearn-installed
OUT ?= runs/demo
SEED ?= 0
# Triton runs in its CPU interpreter unless told otherwise (CI has no GPU): `make test TRITON_INTERPRET=0` on a GPU.
TRITON_INTERPRET ?= 1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/pyunlearn/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC) "setuptools>=64" wheel ninja pybind11
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyunlearn demo --out $(OUT) --seed $(SEED)

test: $(STAMP)
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info pyunlearn/*.so
