#!/usr/bin/env bash
# The GPU checks, as one prepared command for a lent GPU machine (the `device` tool): the CUDA paths of the policy
# engine and the weight stage, and the two benchmarks, on the shipped tiny model. Nothing here runs in CI.
#
# Why a script: device time is scarce (minutes per session), so the checks run as one call whose parts each have
# their own time limit, and whose output is kept under $OUT. The GPU image has torch, transformers, peft and
# accelerate but not dspy or trl: carry them as wheels in .whl/ (see the device README), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       dspy==3.4.1 trl==1.16.0 datasets dill multiprocess pydantic pydantic-core ... (the import closure)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, trl, dspy; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'dspy', dspy.__version__,
'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# 1. correctness on CUDA: the engine, the TRL seam's contract and the weight stage (fast tests; the tiny model)
timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" -o addopts="" tests/rl/test_engine.py \
  tests/rl/test_grpo.py tests/rl/test_weight_stage.py --tb=line 2>&1 | grep -v "Loading weights" | tail -40 | tee "$OUT/tests.txt"
# 2. speed ratios, side by side in one run (tiny model: the ratios say what our layers cost, not what a GPU can do)
timeout 120 python3 benchmarks/engine_throughput.py --rounds 5 2>&1 | grep -v Warning | tail -6 | tee "$OUT/engine.txt"
timeout 150 python3 benchmarks/grpo_overhead.py --rounds 3 2>&1 | grep -v Warning | tail -14 | tee "$OUT/grpo.txt"
