#!/usr/bin/env bash
# The prepared check for the day a GPU is lent: no GPU has run this project's CUDA paths yet, and a
# lent machine is short-lived, so everything to run is fixed here, bounded, and leaves its results
# in files.
#
# Parts, in order, each under `timeout` and together under TOTAL_S seconds (540, under 10 minutes):
#   nvidia-smi          the driver's view: GPU name, memory, driver version
#   cuda-smoke          benchmarks/cuda_smoke.py: torch sees the GPU; bf16 and fp32 matmul TFLOP/s
#   ppo-step            benchmarks/ppo_step.py --device cuda --reference-shapes, 1 warmup + 3 steps
#   bf16-precision      pytest tests/test_inference_precision.py (the inference bf16 rule)
# A part that fails or times out does not stop the ones after it.
#
# Results go under $OUT (default work/gpu-check): <part>.log with each part's output, ppo-step.json
# (the benchmark's JSON line), cuda-smoke.json, and summary.json with every part's exit status and
# seconds (124 = timed out). The script exits 1 when any part failed, timed out or was skipped.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run  print the plan (each part's bound and command) and check that every script, test file
#              and the interpreter it names exist, without running anything; exit 0 when they do.
# Environment: PYTHON (default .venv/bin/python), OUT, TOTAL_S.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/work/gpu-check}
TOTAL_S=${TOTAL_S:-540}
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1

# name | seconds | files the command needs (space-separated, relative to the root) | command
PARTS=(
  "nvidia-smi|30||nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv && nvidia-smi"
  "cuda-smoke|90|benchmarks/cuda_smoke.py|\"$PYTHON\" benchmarks/cuda_smoke.py"
  "ppo-step|300|benchmarks/ppo_step.py benchmarks/reward_throughput.py|\"$PYTHON\" benchmarks/ppo_step.py --device cuda --reference-shapes --warmup 1 --steps 3 --json"
  "bf16-precision|120|tests/test_inference_precision.py|\"$PYTHON\" -m pytest tests/test_inference_precision.py -q -p no:cacheprovider"
)

if (( DRY_RUN )); then
  echo "gpu_check plan (dry run; nothing runs), results would go to $OUT, total bound ${TOTAL_S}s"
  missing=0
  if [[ ! -x "$PYTHON" ]]; then
    echo "MISSING interpreter: $PYTHON (set PYTHON)"
    missing=1
  fi
  for part in "${PARTS[@]}"; do
    IFS='|' read -r name seconds needs command <<<"$part"
    echo "  $name (timeout ${seconds}s): $command"
    for file in $needs; do
      if [[ ! -f "$ROOT/$file" ]]; then
        echo "MISSING $file, needed by $name"
        missing=1
      fi
    done
  done
  exit "$missing"
fi

mkdir -p "$OUT"
start=$SECONDS
summary=()
failed=0
for part in "${PARTS[@]}"; do
  IFS='|' read -r name seconds needs command <<<"$part"
  left=$(( TOTAL_S - (SECONDS - start) ))
  (( seconds > left )) && seconds=$left
  if (( seconds <= 0 )); then
    echo "== $name: skipped, the ${TOTAL_S}s total is spent"
    summary+=("\"$name\": {\"rc\": null, \"seconds\": 0, \"skipped\": true}")
    failed=1
    continue
  fi
  echo "== $name (timeout ${seconds}s): $command"
  began=$SECONDS
  timeout --kill-after=10 "$seconds" bash -c "$command" >"$OUT/$name.log" 2>&1
  rc=$?
  (( rc != 0 )) && failed=1
  took=$(( SECONDS - began ))
  tail -n 5 "$OUT/$name.log"
  echo "== $name: exit $rc after ${took}s"
  summary+=("\"$name\": {\"rc\": $rc, \"seconds\": $took, \"skipped\": false}")
done
# The two parts that print JSON end with it; keep that line on its own.
for name in cuda-smoke ppo-step; do
  last=$(tail -n 1 "$OUT/$name.log" 2>/dev/null)
  [[ $last == \{* ]] && printf '%s\n' "$last" >"$OUT/$name.json"
done
{
  printf '{'
  (IFS=,; printf '%s' "${summary[*]}")
  printf ', "total_seconds": %d}\n' $(( SECONDS - start ))
} >"$OUT/summary.json"
cat "$OUT/summary.json"
exit "$failed"
