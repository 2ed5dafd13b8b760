#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA smoke tests, then the full-size benchmark.
# Results land in $OUT (gpu.json, gpu.md, logs).  Wheels the machine lacks travel in .whl/
# (see docs/benchmarks.md, "GPU"); nothing here is needed in CI.
#
#   bash bench/device_run.sh            (BUDGET=seconds for the benchmark, default 400)
set -u
OUT=${OUT:-/tmp/fp-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
timeout 180 python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider 2>&1 | tee "$OUT/cuda-tests.txt" | tail -25
python3 -m bench.bench_gpu --budget-s "${BUDGET:-400}" --json "$OUT/gpu.json" --md "$OUT/gpu.md" 2>&1 \
  | grep -v "it/s]" > "$OUT/bench.log"
tail -60 "$OUT/bench.log"
