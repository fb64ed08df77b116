#!/usr/bin/env bash
# What a lent GPU machine should measure, in as few device calls as possible.
#
#   bash benchmarks/gpu_session.sh [tests] [group_norm] [attention] [memory]     (default: all four)
#
# Run from the repository root on a machine with CUDA, torch and triton (the lent machines have them;
# nothing is downloaded: the project is installed in place without dependencies). Each stage writes
# its log and JSON under $OUT (default benchmarks/out/gpu), and the figures go into
# benchmarks/RESULTS.md with the device, the date and the command.
#   tests       the kernel tests on compiled kernels (TEXT2CT_TEST_DEVICE=cuda, interpreter off)
#   group_norm  benchmarks/bench_group_norm.py, VAE and UNet shapes, bf16 and fp16, both layouts
#   attention   benchmarks/bench_attention.py, UNet shapes, bf16
#   memory      benchmarks/bench_memory.py: measured peaks of sampling, decoding and training vs the plan
set -uo pipefail
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests group_norm attention memory)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}

if ! $PY -c "import text2ct_engine.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/device.txt"

status=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  case $stage in
    tests)
      TEXT2CT_TEST_DEVICE=cuda $PY -m pytest tests/test_group_norm.py tests/test_attention.py -m kernel \
        -p no:cacheprovider -q -ra 2>&1 | tee "$OUT/kernel_tests.txt" ;;
    group_norm)
      $PY benchmarks/bench_group_norm.py --out "$OUT/group_norm.json" 2>&1 | tee "$OUT/group_norm.txt" &&
      $PY benchmarks/bench_group_norm.py --channels-last --no-compile --out "$OUT/group_norm_cl.json" 2>&1 |
        tee "$OUT/group_norm_cl.txt" ;;
    attention)
      $PY benchmarks/bench_attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.txt" ;;
    memory)
      $PY benchmarks/bench_memory.py --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.txt" ;;
    *) echo "unknown stage $stage (tests, group_norm, attention, memory)"; exit 2 ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "stage $stage failed with $rc"; status=1; }
done
exit $status
