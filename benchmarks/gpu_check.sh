#!/usr/bin/env bash
# The prepared check for the day a GPU is lent: no GPU has run this project's CUDA paths yet, and a
# lent machine is short-lived, so everything to run is fixed here, bounded, and leaves its results
# in files.
#
# Parts, in order, each under `timeout`; the bounds sum to 475 s and TOTAL_S (480 s, 8 minutes on one
# H200) caps the whole run. A part's bound covers building its random-weight model too.
#   part                  bound  what it runs
#   nvidia-smi              10 s  the driver's view: GPU name, memory, driver version
#   cuda-smoke              40 s  benchmarks/cuda_smoke.py: torch sees the GPU; bf16 and fp32 matmul TFLOP/s
#   ppo-step                50 s  benchmarks/ppo_step.py --reference-shapes, 1 warmup + 3 steps
#   bf16-precision          40 s  pytest tests/test_inference_precision.py (the inference bf16 rule)
#   reward-7b-zero2         80 s  benchmarks/reward_throughput.py --shape 7b-like, bf16, ZeRO-2,
#                                 gradient checkpointing, 1 warmup + 3 steps: MFU, peak GPU memory
#   reward-7b-zero3         80 s  the same under ZeRO-3
#   ppo-1b-hf               90 s  benchmarks/ppo_step.py --shape 1b, six roles, bf16, the hf engine,
#                                 1 warmup + 2 steps: rollout tokens/s, step breakdown, peak GPU memory
#   ppo-1b-vllm             85 s  SLOT for the vllm engine (being built elsewhere): the same step with
#                                 --rollout-engine vllm; runs only when $ROOT/.venv-vllm exists
# A part that fails or times out does not stop the ones after it; a slot whose environment is absent
# is skipped without failing the check.
#
# Results go under $OUT (default work/gpu-check): <part>.log with each part's output, <part>.json
# for each part whose output ends with a JSON line (the benchmarks' --json figures), and
# summary.json with every part's exit status and seconds (124 = timed out). The script exits 1 when
# any part failed, timed out or was cut by TOTAL_S.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run  print the plan (each part's bound and command) and check that every script, test file
#              and the interpreter it names exist, and that each benchmark's --help still lists every
#              flag the plan passes it (so a renamed flag fails here, not on the GPU), without running
#              anything; exit 0 when they do.
# Environment: PYTHON (default .venv/bin/python), OUT, TOTAL_S.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/work/gpu-check}
TOTAL_S=${TOTAL_S:-480}
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1

# Sizes both big benchmarks share: bf16 on the GPU, short runs (the build dominates their bound).
REWARD_7B="\"$PYTHON\" benchmarks/reward_throughput.py --device cuda --shape 7b-like --precision bf16 --gradient-checkpointing --warmup 1 --steps 3 --json"
PPO_1B="benchmarks/ppo_step.py --device cuda --shape 1b --precision bf16 --prompts 8 --max-new-tokens 64 --warmup 1 --steps 2 --json"
# name | seconds | files the command needs (space-separated, relative to the root) | environment
# folder that must exist for the part to run (empty: always runs) | command
PARTS=(
  "nvidia-smi|10|||nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv && nvidia-smi"
  "cuda-smoke|40|benchmarks/cuda_smoke.py||\"$PYTHON\" benchmarks/cuda_smoke.py"
  "ppo-step|50|benchmarks/ppo_step.py benchmarks/reward_throughput.py||\"$PYTHON\" benchmarks/ppo_step.py --device cuda --reference-shapes --warmup 1 --steps 3 --json"
  "bf16-precision|40|tests/test_inference_precision.py||\"$PYTHON\" -m pytest tests/test_inference_precision.py -q -p no:cacheprovider"
  "reward-7b-zero2|80|benchmarks/reward_throughput.py||$REWARD_7B --zero-stage 2"
  "reward-7b-zero3|80|benchmarks/reward_throughput.py||$REWARD_7B --zero-stage 3"
  "ppo-1b-hf|90|benchmarks/ppo_step.py benchmarks/reward_throughput.py||\"$PYTHON\" $PPO_1B --rollout-engine hf"
  # SLOT, vllm engine: the trainer still runs from $PYTHON; the engine's own environment is .venv-vllm.
  "ppo-1b-vllm|85|benchmarks/ppo_step.py benchmarks/reward_throughput.py|.venv-vllm|\"$PYTHON\" $PPO_1B --rollout-engine vllm"
)

# The flags a command passes to one benchmark script: every --word after the script's path.
flags_of() {
  local script=$1 command=$2
  grep -oE -- '(^| )--[a-z0-9-]+' <<<"${command#*"$script"}" | tr -d ' '
}

if (( DRY_RUN )); then
  echo "gpu_check plan (dry run; nothing runs), results would go to $OUT, total bound ${TOTAL_S}s"
  missing=0
  if [[ ! -x "$PYTHON" ]]; then
    echo "MISSING interpreter: $PYTHON (set PYTHON)"
    missing=1
  fi
  declare -A helps=()
  for part in "${PARTS[@]}"; do
    IFS='|' read -r name seconds needs requires command <<<"$part"
    when=""
    [[ -n $requires ]] && when=" [runs only when $requires exists: $([[ -d $ROOT/$requires ]] && echo present || echo absent now)]"
    echo "  $name (timeout ${seconds}s)$when: $command"
    for file in $needs; do
      if [[ ! -f "$ROOT/$file" ]]; then
        echo "MISSING $file, needed by $name"
        missing=1
        continue
      fi
      [[ $file == benchmarks/*.py && $command == *"$file"* ]] || continue
      if [[ -z ${helps[$file]+set} && -x "$PYTHON" ]]; then
        helps[$file]=$("$PYTHON" "$file" --help 2>&1) || {
          echo "BROKEN $file --help, needed by $name"
          missing=1
        }
      fi
      for flag in $(flags_of "$file" "$command"); do
        if ! grep -qE -- "(^|[ ,\[])$flag([ ,=]|\$)" <<<"${helps[$file]:-}"; then
          echo "MISSING flag $flag in $file --help, needed by $name"
          missing=1
        fi
      done
    done
  done
  exit "$missing"
fi

mkdir -p "$OUT"
start=$SECONDS
summary=()
failed=0
for part in "${PARTS[@]}"; do
  IFS='|' read -r name seconds needs requires command <<<"$part"
  if [[ -n $requires && ! -d $ROOT/$requires ]]; then
    echo "== $name: skipped, $requires does not exist (an optional slot; not a failure)"
    summary+=("\"$name\": {\"rc\": null, \"seconds\": 0, \"skipped\": \"$requires absent\"}")
    continue
  fi
  left=$(( TOTAL_S - (SECONDS - start) ))
  (( seconds > left )) && seconds=$left
  if (( seconds <= 0 )); then
    echo "== $name: skipped, the ${TOTAL_S}s total is spent"
    summary+=("\"$name\": {\"rc\": null, \"seconds\": 0, \"skipped\": \"total spent\"}")
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
  # A part whose output ends with a JSON line (the benchmarks' --json): keep that line on its own.
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
