# One target per check; CI (.ci/run) calls these same targets.
PY ?= python3
PIP ?= $(PY) -m pip
STAMP := .make/installed

.PHONY: install run test lint typecheck check mutate bench bench-attention bench-tensor bench-lora bench-service bench-load compose-config gpu-bench clean

$(STAMP): pyproject.toml
	@mkdir -p .make
	$(PIP) install -q -e '.[dev]'
	@if ! command -v redis-server >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then \
	  echo "installing redis-server and docker-compose (Debian packages)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server docker-compose) >/dev/null; fi
	@touch $(STAMP)

install: $(STAMP)

## The service with an embedded default: API + one worker in one process, no Redis needed.
run: $(STAMP)
	EMBEDDED=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m uvicorn app.main:app --host 127.0.0.1 --port $${PORT:-8000}

## Everything: compute, service against a real redis-server the tests start, deployment checks.
test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check compute app workers tests benchmarks
	$(PY) -m ruff format --check compute app workers tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy compute app workers

check: lint typecheck test

## Mutation testing, not in CI (minutes): each bug of tests/mutation/mutants.toml is planted in a
## scratch copy and its tests must fail (docs/testing.md). Select with
## MUTATE_ARGS="--area compute" or MUTATE_ARGS="--only ID ...".
mutate: $(STAMP)
	$(PY) tests/mutation/run.py $(MUTATE_ARGS)

bench: bench-attention bench-tensor bench-lora bench-service bench-load

bench-attention: $(STAMP)
	$(PY) benchmarks/attention.py

bench-tensor: $(STAMP)
	$(PY) benchmarks/tensor_attention.py

bench-lora: $(STAMP)
	$(PY) benchmarks/lora_gradient.py

bench-service: $(STAMP)
	$(PY) benchmarks/service.py

## 1,000 jobs, 50 clients, a worker kill -9 and a Redis crash mid-run: lost/duplicated/5xx counts.
bench-load: $(STAMP)
	$(PY) benchmarks/load.py

compose-config:
	$(PY) -m pytest -q tests/test_deploy.py

gpu-bench:
	bash benchmarks/gpu.sh

clean:
	rm -rf .make .pytest_cache .mypy_cache .ruff_cache benchmarks/out
