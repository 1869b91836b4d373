# The two front-door commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: run test lint binary bench smoke clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): requirements.txt requirements-dev.txt constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

.env:
	cp .env.example .env

## run: the gateway on :8080 in the foreground, the bundled mock upstream on :4000 behind it
run: $(STAMP) .env
	@scripts/run_local.sh

## test: the whole suite (real redis-server processes on free ports, real gateway processes),
## over every core, then the tests that time something alone (scripts/test.sh)
test: $(STAMP)
	PYTHON=$(PY) scripts/test.sh $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway mock tests bench gateway.py
	$(VENV)/bin/mypy gateway
	$(VENV)/bin/lint-imports

## binary: one-file executable dist/gateway
binary: $(STAMP)
	$(VENV)/bin/pyinstaller --noconfirm --clean build.spec

smoke: binary
	scripts/smoke_all.sh dist/gateway

bench: $(STAMP)
	bench/run.sh

clean:
	rm -rf build dist
