# Two entry points: `make demo` (set up, then a short CLIP pre-training + evaluation on built-in scenes)
# and `make test` (set up, then the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: keep one that is already there, else the pinned local CPU build; never an unpinned torch
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@command -v java >/dev/null 2>&1 || echo "note: java not found; caption metrics (BLEU/CIDEr) will use a" \
		"pure-Python PTB tokenizer and may differ slightly from pycocoevalcap's. Install Java 8+ for exact scores."
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/vlpt demo --out runs/demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
