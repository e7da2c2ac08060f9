# iSM — two commands on a fresh machine:
#   make demo   set up and run the demonstration
#   make test   set up and run lint, type checks, the whole test suite and the benchmarks (quick mode)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
EXAMPLES_OUT := build/examples

.PHONY: all demo test setup examples lint unit bench bench-full clean

all: test

$(STAMP): pyproject.toml setup.py scripts/bootstrap.sh src/ism/formats/_cbor_native.c
	PYTHON=$(PYTHON) ./scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	PYTHON=$(PYTHON) ./scripts/bootstrap.sh $(VENV) test
	@touch $(TEST_STAMP)

setup: $(STAMP)

examples: $(STAMP)
	$(BIN)/python examples/build.py $(EXAMPLES_OUT)

demo: examples
	$(BIN)/ism demo --examples $(EXAMPLES_OUT) --out demo-out

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(TEST_STAMP) examples
	$(BIN)/pytest -q

BENCHMARKS := boot cose hostcall gateway density services attest ms_lifecycle

bench: $(TEST_STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py --quick || exit 1; done

bench-full: $(TEST_STAMP)
	@for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py || exit 1; done

test: lint unit bench

clean:
	rm -rf build demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
