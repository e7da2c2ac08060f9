# iSM — two commands on a fresh machine:
#   make demo   set up and run the demonstration
#   make test   set up and run lint, type checks, the whole test suite and the benchmarks (quick mode)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXAMPLES_OUT := build/examples

.PHONY: all demo test setup examples lint unit bench bench-full clean

all: test

$(STAMP): pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) ./scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

setup: $(STAMP)

examples: $(STAMP)
	$(BIN)/python examples/build.py $(EXAMPLES_OUT)

demo: examples
	$(BIN)/ism demo --examples $(EXAMPLES_OUT) --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: examples
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/boot.py --quick
	$(BIN)/python benchmarks/cose.py --quick

bench-full: $(STAMP)
	$(BIN)/python benchmarks/boot.py
	$(BIN)/python benchmarks/cose.py

test: lint unit bench

clean:
	rm -rf build demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
