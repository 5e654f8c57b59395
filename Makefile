# Newcomer entry points. Each target first runs the idempotent set-up (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup setup-test test test-unit example finetune lint

setup:
	bash scripts/setup.sh

# setup + Debian's chromium (the report test opens report.html in headless Chromium).
setup-test:
	bash scripts/setup_test.sh

# The whole test suite that CI runs: unit, distributed (2 gloo processes) and integration (real Ray).
test: setup-test
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

# The main job: search compression recipes for the packaged MiniLM on MR sentiment (2 DDP
# workers per trial, embedded local Ray); writes runs/quickstart/report.html.
example: setup
	.venv/bin/orchestrator search jobs/quickstart.yaml

# Fine-tune the packaged MiniLM on MR sentiment with 2 DDP workers on a local Ray.
finetune: setup
	.venv/bin/orchestrator train jobs/minilm_mr_finetune.yaml

lint: setup
	.venv/bin/ruff check orchestrator tests benchmarks
