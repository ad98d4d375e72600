#!/usr/bin/env bash
# Probe (not a feature): builds budget_alloc.so, a CPU allocator for PyTorch that keeps freed
# blocks of 1 MiB and more (rounded up to a multiple of 1/16 of the next power of two) for reuse, least recently
# freed evicted first, up to a byte budget; smaller blocks go to PyTorch's default allocator.
# sitecustomize.py (on PYTHONPATH, with BUDGET_MB=<MiB> set) installs it with
# c10::SetCPUAllocator when agro.trainer is imported and prints its hits, misses and "dropped"
# (blocks freed to the system: evicted, or larger than the budget) at exit. BUDGET_MB unset: not
# installed (BUDGET_MB=0 installs it with no cache, which is not the baseline). docs/RESULTS.md, "AMD EPYC (Zen 5), 2026-12-05 (fifth)":
#
#   bash bench/budget_alloc/build.sh
#   BUDGET_MB=512 PYTHONPATH=bench/budget_alloc LD_PRELOAD=<jemalloc> \
#       ONEDNN_PRIMITIVE_CACHE_CAPACITY=128 LRU_CACHE_CAPACITY=128 \
#       .venv/bin/python bench/learner_faults.py fp32 --steps 4
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../../.venv/bin/python}
T=$($PY -c "import os, torch; print(os.path.dirname(torch.__file__))")
ABI=$($PY -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
g++ -O2 -std=c++17 -shared -fPIC -D_GLIBCXX_USE_CXX11_ABI=$ABI -I"$T/include" \
    -I"$T/include/torch/csrc/api/include" budget_alloc.cpp -L"$T/lib" -lc10 \
    -Wl,-rpath,"$T/lib" -o budget_alloc.so
echo "built $(pwd)/budget_alloc.so"
