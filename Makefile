# Two commands set up everything on a fresh machine:
#   make quickstart   install what is missing, then run the offline pipeline (dvc repro)
#   make test         install what is missing, then run the test suite offline
# Python >= 3.10 is the only prerequisite (plus npm for the npm text corpus of the quickstart).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
NO_TELEMETRY := DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# Tests run fully offline (design.md 6); the pipeline keeps the hub reachable for the gpt2 profiles.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(NO_TELEMETRY)

.PHONY: install quickstart test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels onto a CPU machine.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	@test -d .dvc || (echo "not a DVC repository: run from the repo root" && exit 1)
	$(NO_TELEMETRY) PATH=$(abspath $(BIN)):$$PATH dvc repro

test: install
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q
