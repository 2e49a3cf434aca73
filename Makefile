# Every target bootstraps its own virtual environment from setup.cfg, so a
# fresh clone needs only python3 (>= 3.9) with venv: `make run`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean install uninstall

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test,dev]'
	touch $(STAMP)

venv: $(STAMP)

## run: the companion server and an agent on loopback, telemetry printed as it arrives
run: $(STAMP)
	$(BIN)/python -m agent.devrun

## test: the whole suite (real sockets, real processes, real SQLite files)
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy agent
	@! grep -rn --include='*.py' 'shell=True' agent/ || \
		{ echo "shell=True is forbidden in agent/"; exit 1; }

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache .hypothesis
