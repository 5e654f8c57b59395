# Newcomer entry points. Each target first runs the idempotent set-up (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup setup-test test test-unit example finetune lint

setup:
	bash scripts/setup.sh

# setup + Debian's chromium (the report test opens report.html in headless Chromium) and
# shellcheck (the unit tier checks cluster/local_head.sh with it).
setup-test:
	bash scripts/setup_test.sh

# The whole test suite that CI runs, tier by tier: the unit tier first, and only if it passes
# the distributed (2 gloo processes) and integration (real Ray) tiers. Every test carries one
# tier marker (tests/conftest.py refuses one without), so the two runs cover the suite.
test: setup-test
	$(PY) -m pytest -m unit tests
	$(PY) -m pytest -m "distributed or integration" tests

# The unit tier alone, as `make test` runs it first (without the apt packages of setup-test:
# the shellcheck test skips when shellcheck is missing).
test-unit: setup
	$(PY) -m pytest -m unit tests

# The main job: search compression recipes for the packaged MiniLM on MR sentiment (2 DDP
# workers per trial, embedded local Ray); writes runs/quickstart/report.html.
example: setup
	.venv/bin/orchestrator search jobs/quickstart.yaml

# Fine-tune the packaged MiniLM on MR sentiment with 2 DDP workers on a local Ray.
finetune: setup
	.venv/bin/orchestrator train jobs/minilm_mr_finetune.yaml

lint: setup
	.venv/bin/ruff check orchestrator tests benchmarks
