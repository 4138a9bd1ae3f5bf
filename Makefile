# The two commands: `make run` (set up, then serve) and `make test` (set up, then test).
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8321
# pytest-xdist workers: tests mostly wait on servers, so a few more workers than cores keep both busy.
TEST_WORKERS ?= 3
PYTEST := -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup run demo test unit integration lint bench dist clean setup-ogx run-ogx test-ogx docs

# uv installs in seconds where pip takes minutes; --compile-bytecode as pip does, so that stacks
# started at once by parallel tests do not each compile the same modules on their first import.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
		{ echo "llama-stack 0.7 needs Python >= 3.12; $(PYTHON) is older (set PYTHON=/path/to/python3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e '.[llama-stack,test,responses,cli]'
	$(PY) tools/tiktoken_cache.py
	touch $(STAMP)

# The same package on OGX 1.x, in an environment of its own (the two stacks pin mcp differently).
VENV_OGX := .venv-ogx
PY_OGX := $(VENV_OGX)/bin/python
STAMP_OGX := $(VENV_OGX)/.installed

$(STAMP_OGX): pyproject.toml
	$(PYTHON) -m venv $(VENV_OGX)
	$(PY_OGX) -m pip install --quiet uv
	$(VENV_OGX)/bin/uv pip install --quiet --compile-bytecode --python $(PY_OGX) -e '.[ogx,test,responses,cli]'
	$(PY_OGX) tools/tiktoken_cache.py
	touch $(STAMP_OGX)

setup: $(STAMP)

run: setup  ## serve on $(PORT); starts the stand-in model server when MODEL_URL is unset
	$(PY) tools/serve.py --port $(PORT)

demo: setup  ## submit small batches to the server of `make run` on $(PORT) (or at LLAMA_STACK_URL) and print the results
	$(PY) tools/demo.py --port $(PORT)

test: setup  ## lint, unit and integration tests
	$(VENV)/bin/ruff check .
	$(PY) $(PYTEST)

setup-ogx: $(STAMP_OGX)

run-ogx: setup-ogx  ## serve run-ogx.yaml with OGX 1.x on $(PORT)
	$(PY_OGX) tools/serve.py --port $(PORT)

test-ogx: setup-ogx  ## the unit suite, and the integration tests of tests/integration/ogx_subset.txt, on OGX
	$(PY_OGX) $(PYTEST) tests/unit $$(cat tests/integration/ogx_subset.txt)

unit: setup
	$(PY) $(PYTEST) tests/unit

integration: setup
	$(PY) $(PYTEST) tests/integration

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

docs: setup  ## serve the documentation site (docs/, mkdocs.yml) on 127.0.0.1:8001, rebuilt on every change
	$(VENV)/bin/mkdocs serve -a 127.0.0.1:8001

dist: setup  ## build the wheel and sdist into dist/ (pip install dist/*.whl elsewhere)
	$(PY) -m build --outdir dist .

clean:  ## delete the venv (with the tokenizer cache), the state of `make run` (batches, files), dist/ and caches
	rm -rf $(VENV) $(VENV_OGX) .state dist build .pytest_cache .ruff_cache *.egg-info
