# The two set-up commands of the README: `make run` (main job on the embedded default) and `make test`.
# Both create the virtual environment when it is missing. Every install goes through constraints.txt.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test venv
venv: $(STAMP)

# torch first and pinned: an unpinned torch pulls torch 2.15 plus gigabytes of CUDA packages.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/coalora run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
