# The two commands of the README:
#   make demo   set everything up, then run the main job (scenarios/demo.yaml in Mininet)
#   make test   set everything up, then run lint + the fast and CI test tiers
# Set-up is idempotent: a second run checks and skips what is already there.

PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
# Tiers: `slow` loads the real Qwen models (benchmark tier, `make test-slow`).
CI_TIERS := not slow

.PHONY: setup setup-all demo demo-inprocess test test-slow lint bench

setup:          ## venv, pinned packages, Debian packages, the CI model (smollm2-135m)
	bash scripts/setup.sh --models ci

setup-all:      ## as setup, plus the Qwen2.5-Coder 0.5B and 1.5B models
	bash scripts/setup.sh --models all

demo: setup-all ## the main job: the demo scenario in Mininet (root), table + plots
	$(PY) -m testbed.cli run scenarios/demo.yaml --report

demo-inprocess: setup-all ## the same comparison in one process, no network, no root
	$(PY) -m specfed.demo

lint:
	$(PY) -m ruff check specfed testbed topologies analysis tests
	$(PY) -m mypy

test: setup lint ## lint + every test outside the slow tier
	$(PYTEST) -m "$(CI_TIERS)"

test-slow: setup-all ## the real-model tests (minutes)
	$(PYTEST) -m slow

bench: setup-all ## the benchmark commands; each prints JSON
	$(PY) -m specfed.bench round
	$(PY) -m specfed.bench vs-hf
	$(PY) -m specfed.bench dtype
	$(PY) -m specfed.bench loopback
	$(PY) -m testbed.linkbench
