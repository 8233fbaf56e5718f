# xmodal-index developer commands. Everything installs into ./.venv from this repo's files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SAMPLE ?= sample-archive
WORK   ?= sample-work

.PHONY: setup demo test test-all lint bench clean-sample chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a CUDA build from PyPI
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,test,adapters,text-models,lint]"
	touch $@

setup: $(VENV)/.installed

# Build the bundled sample archive, index it, and show example queries (their media paths,
# ../sample-archive/..., are relative to examples/sample_queries.jsonl: keep SAMPLE = sample-archive).
demo: setup
	$(VENV)/bin/xmodal-index make-sample --out $(SAMPLE) --force
	$(VENV)/bin/xmodal-index run --source $(SAMPLE) --workdir $(WORK) --config examples/sample.toml
	$(VENV)/bin/xmodal-index query --index $(WORK)/indexes/main --queries examples/sample_queries.jsonl -k 5

# Debian's chromium for the run report's browser test: installed as root where apt-get exists
# (the test is skipped, with the reason, where it is missing).
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the report's browser test will be skipped"; \
	fi

# The test suite CI runs (slow and gpu tests excluded).
test: setup chromium
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

# ruff over the tree, mypy over sinks/, jobs/ and query/ ([tool.ruff], [tool.mypy] in pyproject.toml).
# mypy finds the package under its import name through links in build/lint (the editable
# install maps the top-level folders with an import hook that type checkers cannot follow).
LINT_TREE := build/lint/xmodal_index
lint: setup
	@mkdir -p $(LINT_TREE)
	@for d in pipeline encoders sinks jobs query; do ln -sfn ../../../$$d $(LINT_TREE)/$$d; done
	@for f in __init__.py __main__.py; do ln -sfn ../../../xmodal_index/$$f $(LINT_TREE)/$$f; done
	@# both run, so one report does not hide the other; lint fails if either finds something
	@status=0; \
	echo "$(VENV)/bin/ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "$(VENV)/bin/mypy"; $(VENV)/bin/mypy || status=1; \
	exit $$status

bench: setup
	$(PY) bench/pipeline_vs_loop.py

clean-sample:
	rm -rf $(SAMPLE) $(WORK)
