# facegate: every target sets up what it needs from nothing (venv, packages, models).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extras installed into the venv; the Docker image asks for `build,ann,heic` only (same command, fewer packages).
EXTRAS ?= build,report,test,ann,train,heic
PIP_FLAGS ?= -e
MODELS_DIR ?= models/dist
export FACEGATE_MODELS_DIR ?= $(abspath $(MODELS_DIR))
PYTEST_ARGS ?=

.PHONY: venv models run test typecheck lint bench docker-test clean browser

comma := ,
venv: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) '.[$(EXTRAS)]'
	touch $@

models: venv
	$(BIN)/python -m models.build --out $(MODELS_DIR)

run: models
	$(BIN)/facegate serve

test: models browser typecheck lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# mypy --strict over the code that ships, the benches and the tests (pyproject.toml [tool.mypy]; the tests with two
# checks relaxed: untyped calls into torch, Any returned from numpy).
typecheck: venv
	$(BIN)/python -m mypy app models bench tests

# ruff (pyproject.toml [tool.ruff.lint]): pyflakes, import order, bugbear and pyupgrade over everything, tests included.
lint: venv
	$(BIN)/python -m ruff check app models bench tests migrations

# The web console's tests (tests/ui) drive Debian's Chromium through Playwright, which downloads no browser of its
# own: install the distribution's package when it is missing (as root, as on CI; elsewhere say what to install).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "Chromium is missing: install Debian's chromium package for the browser tests (tests/ui)"

bench: models
	$(BIN)/python -m bench.run

docker-test:
	bash tests/docker/compose_roundtrip.sh

clean:
	rm -rf $(VENV) $(MODELS_DIR) .pytest_cache
