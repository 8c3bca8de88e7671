#!/usr/bin/env bash
# The planner's memory model against the bytes moefold-train allocates: for each folding, with
# and without the distributed optimizer, runs moefold-train for one step (its memory.json lists
# every rank's bytes of parameters, gradients and optimizer state) and `moefold plan --explain
# --json --runtime moefold` on the same model (examples/plan/moefold-train-demo.json), and prints
# planner vs library per pipeline stage (the largest rank of each stage) with the relative error.
# Exits 1 when an error exceeds --tolerance (default 5%).
#
#   scripts/planner-memory.sh                 the default foldings, FP32
#   scripts/planner-memory.sh --bf16          the same, BF16 (moefold-train --bf16)
#   scripts/planner-memory.sh 8,2,2,2,2,1 8,1,1,2,2,1,2    foldings W,TP,CP,PP,EP,ETP[,N]
#                                             (N: distributed-optimizer instances, rows with the
#                                             distributed optimizer only when N > 1)
# Environment: MOEFOLD_BUILD (default build/), which must hold bin/moefold-train and bin/moefold.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${MOEFOLD_BUILD:-$root/build}
model=$root/examples/plan/moefold-train-demo.json
precision=--fp32
train_precision=()
tolerance=5
foldings=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bf16) precision=--bf16; train_precision=(--bf16) ;;
    --fp32) precision=--fp32; train_precision=() ;;
    --tolerance) tolerance=${2:?--tolerance needs a percentage}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) foldings+=("$1") ;;
  esac
  shift
done
[ ${#foldings[@]} -gt 0 ] ||
  foldings=(8,2,2,2,2,1 8,2,1,2,4,1 8,1,1,2,2,2 8,1,1,4,2,1 4,2,1,1,2,2 8,1,1,2,2,1,2)
for bin in moefold-train moefold; do
  [ -x "$build/bin/$bin" ] ||
    { echo "planner-memory: $build/bin/$bin is missing (cmake --build $build --target moefold_train moefold_cli)" >&2; exit 2; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The demo's model and batch (moefold-train's defaults, which the model file describes).
batch=(--global-batch-size 16 --micro-batch-size 2 --seq-length 64)

printf '%-28s %-9s %-6s %14s %14s %7s %14s %14s %7s %14s %14s %7s\n' folding optimizer stage \
  "weights plan" library err "grads plan" library err "optim plan" library err
status=0
for f in "${foldings[@]}"; do
  IFS=, read -r w tp cp pp ep etp n <<<"$f"
  n=${n:-1}
  sizes=(--world-size "$w" --tp "$tp" --cp "$cp" --pp "$pp" --ep "$ep" --etp "$etp")
  label="W$w TP$tp CP$cp PP$pp EP$ep ETP$etp"
  modes=(off on)
  [ "$n" -gt 1 ] && { modes=(on); label="$label N$n"; }
  for mode in "${modes[@]}"; do
    opt=(--no-use-distributed-optimizer)
    train_opt=()
    if [ "$mode" = on ]; then
      opt=(--use-distributed-optimizer --num-distributed-optimizer-instances "$n")
      train_opt=(--use-distributed-optimizer --num-distributed-optimizer-instances "$n")
    fi
    "$build/bin/moefold-train" "${sizes[@]}" "${train_opt[@]}" "${train_precision[@]}" \
      --train-iters 1 --eval-iters 0 --quiet --output-dir "$out/run" >/dev/null
    "$build/bin/moefold" plan --explain --json --model "$model" "${sizes[@]}" "${batch[@]}" \
      "$precision" "${opt[@]}" --runtime moefold >"$out/plan.json"
    python3 - "$out/run/memory.json" "$out/plan.json" "$label" "$mode" "$tolerance" <<'EOF' ||
import json, sys
library, plan = (json.load(open(p)) for p in sys.argv[1:3])
label, mode, tolerance = sys.argv[3], sys.argv[4], float(sys.argv[5])
worst = 0.0
for stage, predicted in enumerate(plan["state_per_stage_bytes"]):
    ranks = [r for r in library["ranks"] if r["pp_rank"] == stage]
    cells = []
    for key, lib_key in (("weights", "parameters"), ("gradients", "gradients"),
                         ("optimizer", "optimizer")):
        measured = max(r[lib_key] for r in ranks)
        error = (predicted[key] - measured) / measured
        worst = max(worst, abs(error))
        cells.append(f"{predicted[key]:14.0f} {measured:14d} {100 * error:+6.2f}%")
    print(f"{label:<28} {mode:<9} {stage:<6} " + " ".join(cells))
sys.exit(1 if 100 * worst > tolerance else 0)
EOF
      status=1
  done
done
[ $status -eq 0 ] && echo "every figure within ${tolerance}%" || echo "some figure off by more than ${tolerance}%"
exit $status
