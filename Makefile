# facegate: every target sets up what it needs from nothing (venv, packages, models).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extras installed into the venv; the Docker image asks for `build` only (same command, fewer packages).
EXTRAS ?= build,report,test
PIP_FLAGS ?= -e
MODELS_DIR ?= models/dist
export FACEGATE_MODELS_DIR ?= $(abspath $(MODELS_DIR))
PYTEST_ARGS ?=

.PHONY: venv models run test bench docker-test clean

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

test: models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: models
	$(BIN)/python -m bench.run

docker-test:
	bash tests/docker/compose_roundtrip.sh

clean:
	rm -rf $(VENV) $(MODELS_DIR) .pytest_cache
