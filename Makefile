# The two commands: `make run` (set up, then serve) and `make test` (set up, then test).
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8321

.PHONY: setup run demo test unit integration lint bench dist clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
		{ echo "llama-stack 0.7 needs Python >= 3.12; $(PYTHON) is older (set PYTHON=/path/to/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,responses,cli]'
	$(PY) tools/tiktoken_cache.py
	touch $(STAMP)

setup: $(STAMP)

run: setup  ## serve on $(PORT); starts the stand-in model server when MODEL_URL is unset
	$(PY) tools/serve.py --port $(PORT)

demo: setup  ## submit a small batch to the server of `make run` and print its results
	$(PY) tools/demo.py

test: setup  ## lint, unit and integration tests
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

dist: setup  ## build the wheel and sdist into dist/ (pip install dist/*.whl elsewhere)
	$(PY) -m build --outdir dist .

clean:  ## delete the venv (with the tokenizer cache), the state of `make run` (batches, files), dist/ and caches
	rm -rf $(VENV) .state dist build .pytest_cache .ruff_cache *.egg-info
