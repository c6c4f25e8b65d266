# llmflow: `make demo` runs the pipeline end to end on the tiny default; `make test` runs the tests.
# Both set everything up on a fresh machine (a .venv with pinned versions) first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := $(BIN)/uv
# vLLM's own environment (its fastapi pin clashes with Prefect's): infra/engines/.
VLLM_ENV := .venv-vllm
# LlamaFactory's (train.backend: llamafactory; it pins transformers<=5.6): ~1.5 min, ~2.2 GB.
LLAMAFACTORY_ENV := .venv-llamafactory
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test drills bench-smoke test-unit test-integration test-gpu bench up down status clean lint

# The three environments build side by side with uv (7 min one after another with pip);
# each target's output is printed whole when it ends.
install:
	@$(MAKE) --no-print-directory -j3 --output-sync=target \
		$(STAMP) $(VLLM_ENV)/.installed $(LLAMAFACTORY_ENV)/.installed

# uv first (the pin of constraints.txt, a few seconds): every environment installs with it.
$(UV):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (llmflow needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -c constraints.txt uv

# torch first, pinned to the CPU build that lies on the machine's disk: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. uv with pip's sources and a cache
# the environments share (infra/local/uv-pip.sh; pip took 3 min here, uv 1).
# examples/metrics-plugin: the example metric plug-in (eval.extra_metrics names its metrics).
$(STAMP): pyproject.toml constraints.txt examples/metrics-plugin/pyproject.toml | $(UV)
	UV=$(UV) bash infra/local/uv-pip.sh $(BIN)/python -c constraints.txt "torch==2.13.0"
	UV=$(UV) bash infra/local/uv-pip.sh $(BIN)/python -c constraints.txt -e ".[dev]" \
		-e examples/metrics-plugin
	@bash infra/local/chromium.sh
	@bash infra/local/postgres.sh
	touch $(STAMP)

# The vLLM engine environment (cpu or cuda variant, by the machine; LLMFLOW_VLLM_VARIANT=none
# skips it): a second venv Ray runs vLLM in. ~2 min and ~4 GB on CPU.
$(VLLM_ENV)/.installed: infra/engines/vllm-cpu.txt infra/engines/vllm-cuda.txt infra/engines/make-env.sh | $(UV)
	UV=$(UV) bash infra/engines/make-env.sh $(VLLM_ENV)

$(LLAMAFACTORY_ENV)/.installed: infra/engines/llamafactory.txt infra/engines/make-env.sh | $(UV)
	UV=$(UV) bash infra/engines/make-env.sh $(LLAMAFACTORY_ENV) llamafactory

# Ends by starting the chat page over the served model and printing its URL. The main
# environment only: the demo's engines are hf (eval.engine and serve.engine `auto` pick vLLM
# only where its environment is built); `make install` or `make test` build the engine ones.
demo: $(STAMP)
	$(BIN)/llmflow demo --config configs/tiny.yaml --chat

# Every run ends with the 25 slowest tests and the time per module (tests/timing.py).
TIMES := --durations=25 --durations-min=1
# LANES="-n 2": two lanes side by side, each with its own stack (tests/conftest.py names each
# module's lane). Not the default: on 2 cores it took make test from 34-43 to 28 min, but under
# the load a second node missed Ray's start deadline and the vLLM canary saw failed requests.
LANES ?=

# The lint and the layout rules (tests/unit/test_layout.py) first: they fail in seconds.
test: install lint
	$(BIN)/python -m pytest tests -m "not gpu" --ignore=tests/drills -p no:cacheprovider $(TIMES) \
		$(LANES)

# Every bench script's smoke run alone (tests/integration/test_bench.py, ~7 min on 2 cores);
# make test runs them too.
bench-smoke: install
	$(BIN)/python -m pytest tests/integration/test_bench.py -p no:cacheprovider $(TIMES)

# Reliability drills (tests/drills): things broken on purpose. CI runs them after `make test`.
drills: install
	$(BIN)/python -m pytest tests/drills -p no:cacheprovider $(TIMES) $(LANES)

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

# The memory check first (real sizes, random weights, minutes), then the GPU tests.
test-gpu: install
	$(BIN)/python -m tests.gpu.memory_plan
	$(BIN)/python -m pytest tests/gpu

# Every benchmark of bench/ on the tiny default, written to bench/RESULTS.md (~15 min on 2 cores).
bench: install
	$(BIN)/python bench/report.py

up: install
	$(BIN)/llmflow up

down:
	$(BIN)/llmflow down

status:
	$(BIN)/llmflow status

CODE := llmflow flows tasks deployments tests bench

lint: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/python -m pytest tests/unit/test_layout.py -q -p no:cacheprovider

clean:
	-$(BIN)/llmflow down 2>/dev/null
	rm -rf $(VENV) $(VLLM_ENV) $(LLAMAFACTORY_ENV) .llmflow
