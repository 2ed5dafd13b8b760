#!/usr/bin/env bash
# One call on a lent GPU machine (under 10 minutes): the speed benchmark, then the CUDA tests.
# Results land in $OUT (speed.json, speed.md, logs).  Wheels the machine lacks travel in .whl/
# (diffusers, pydantic, av, torchao: docs/benchmarks.md, "GPU"); nothing here is needed in CI.
#
#   bash bench/device_run.sh            (BUDGET=seconds for the benchmark, default 360)
#   bash bench/device_run.sh gpu        the earlier whole-job / low-VRAM benchmark instead
#   bash bench/device_run.sh stack      the whole stack (python -m stack, GPUS=0) on CUDA: the tiny
#                                       profile, then random-full (jobs: none, none again, mag,
#                                       first_block), each against generate() alone
set -u
OUT=${OUT:-/tmp/fp-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)
try:
    import torchao; print('torchao', torchao.__version__)
except Exception as e: print('torchao missing:', e)" 2>&1 | grep -v "^W\|Warn" | tee "$OUT/versions.txt"
if [ "${1:-speed}" = stack ]; then
  timeout 170 python3 -m bench.bench_stack_gpu --profile tiny --jobs none,none --direct \
    --json "$OUT/stack-tiny.json" --md "$OUT/stack-tiny.md" 2>&1 | grep -v "it/s]" > "$OUT/bench-tiny.log"
  tail -12 "$OUT/bench-tiny.log"
  left=$(( 560 - ($(date +%s) - start) ))
  timeout "$left" python3 -m bench.bench_stack_gpu --profile random-full --jobs none,none,mag,first_block \
    --direct --timeout 200 --json "$OUT/stack-full.json" --md "$OUT/stack-full.md" 2>&1 | grep -v "it/s]" \
    > "$OUT/bench-full.log"
  tail -25 "$OUT/bench-full.log"
  # at most 8 files come back: the two JSONs, and everything else (the stacks' own logs too) in one archive
  (cd /tmp && tar czf "$OUT/logs.tgz" fp-stack-gpu-*/log -C "$OUT" --exclude='*.json' --exclude=logs.tgz .)
  find "$OUT" -maxdepth 1 -type f ! -name '*.json' ! -name logs.tgz -delete
  ls -la "$OUT"
  exit 0
elif [ "${1:-speed}" = gpu ]; then
  python3 -m bench.bench_gpu --budget-s "${BUDGET:-400}" --json "$OUT/gpu.json" --md "$OUT/gpu.md" 2>&1 \
    | grep -v "it/s]" > "$OUT/bench.log"
else
  python3 -m bench.bench_speed --budget-s "${BUDGET:-360}" --json "$OUT/speed.json" --md "$OUT/speed.md" 2>&1 \
    | grep -v "it/s]" > "$OUT/bench.log"
fi
tail -45 "$OUT/bench.log"
left=$(( 560 - ($(date +%s) - start) ))
if [ "$left" -gt 40 ]; then
  timeout "$left" python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider -x \
    -k "${CUDA_TESTS:-compiled_fp8 or speed_check or high_vram or preview}" 2>&1 | tee "$OUT/cuda-tests.txt" | tail -15
else
  echo "no time left for the CUDA tests ($left s)" | tee "$OUT/cuda-tests.txt"
fi
