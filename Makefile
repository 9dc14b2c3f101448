# Two entry points: `make demo` (the embedded default end to end) and `make test` (the whole suite).
# Both create .venv and install the project from pyproject.toml; nothing else needs to be on the machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cxr synth $(DEMO)/raw --patients 1725 --size 256 --seed 0
	$(VENV)/bin/cxr prepare $(DEMO)/raw $(DEMO)/shards --size 128 --codec uint8 --images-per-shard 250
	$(VENV)/bin/cxr train --config configs/demo.yaml --promote
	$(VENV)/bin/cxr evaluate --model models:/cxr-demo@champion --tracking-uri sqlite:///$(DEMO)/mlflow.db --out $(DEMO)/report
	$(VENV)/bin/cxr explain --model models:/cxr-demo@champion --tracking-uri sqlite:///$(DEMO)/mlflow.db --data $(DEMO)/raw --out $(DEMO)/explain --max-overlays 8
	@$(PY) -c "from cxr.tracking.runs import ui_hint; print('demo done: see $(DEMO)/report/report.md and $(DEMO)/explain/sheets/;', ui_hint('sqlite:///$(DEMO)/mlflow.db', 'cxr-demo'))"

test: $(STAMP)
	$(VENV)/bin/ruff check cxr jobs tests bench
	$(VENV)/bin/python -m pytest -q --durations=25

bench: $(STAMP)
	mkdir -p bench-out
	$(PY) bench/inspect_metadata.py bench-out/inspect.json
	$(PY) bench/inspect_specs.py --out bench-out/inspect-specs.json
	$(PY) bench/prepare.py --out bench-out/prepare.json
	$(PY) bench/pipeline.py --out bench-out/pipeline.json
	$(PY) bench/train.py --out bench-out/train.json
	$(PY) bench/evaluate.py --out bench-out/evaluate.json
	$(PY) bench/predict.py --out bench-out/predict.json
	$(PY) bench/layouts.py --out bench-out/layouts.json
	$(PY) bench/retrain_tail.py --out bench-out/retrain-tail.json

clean:
	rm -rf $(DEMO) bench-out
