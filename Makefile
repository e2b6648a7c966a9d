# Every target creates and uses .venv itself; a fresh Debian machine with Python 3.11 needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Every shipped trace: our own (YAML, JSON Lines, binary), the QEMU-log import, the QEMU 7.2 scenarios.
run: $(STAMP)
	$(BIN)/vtd-emu replay --check traces/*.yaml traces/*.jsonl traces/*.npz traces/qemu-import/*.yaml traces/qemu-7.2/*.jsonl

# pytest exits 5 when it collects no test; that is not a failure of the tree.
test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --output BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/python -m compileall -q vtd_emu tests scripts
	$(BIN)/python -m mypy vtd_emu

clean:
	rm -rf $(VENV) build dist *.egg-info
