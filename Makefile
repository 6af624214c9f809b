# The two commands of the README:
#   make demo   set everything up, then run the main job (the demo)
#   make test   set everything up, then run lint + the fast and CI test tiers
# Set-up is idempotent: a second run checks and skips what is already there.

PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
# Tiers: `slow` loads the real Qwen models (benchmark tier, `make test-slow`).
CI_TIERS := not slow

.PHONY: setup setup-all demo test test-slow lint bench clean-venv

setup:          ## venv, pinned packages, Debian packages, the CI model (smollm2-135m)
	bash scripts/setup.sh --models ci

setup-all:      ## as setup, plus the Qwen2.5-Coder 0.5B and 1.5B models
	bash scripts/setup.sh --models all

demo: setup-all ## the main job: federated generation with real models, comparison table
	$(PY) -m specfed.demo

lint:
	$(PY) -m ruff check specfed tests
	$(PY) -m mypy

test: setup lint ## lint + every test outside the slow tier
	$(PYTEST) -m "$(CI_TIERS)"

test-slow: setup-all ## the real-model tests (minutes)
	$(PYTEST) -m slow

bench: setup-all ## the benchmark commands; each prints JSON
	$(PY) -m specfed.bench round
	$(PY) -m specfed.bench vs-hf
	$(PY) -m specfed.bench dtype
