# Newcomer entry points. Each target first runs the idempotent set-up (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup test test-unit example lint

setup:
	bash scripts/setup.sh

# The whole test suite that CI runs: unit, distributed (2 gloo processes) and integration (real Ray).
test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

# The main example: fine-tune the packaged MiniLM on MR sentiment with 2 DDP workers on a local Ray.
example: setup
	.venv/bin/orchestrator train jobs/minilm_mr_finetune.yaml

lint: setup
	.venv/bin/ruff check orchestrator tests benchmarks
