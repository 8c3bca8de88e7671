#!/usr/bin/env bash
# The folded step's parallel efficiency: moefold-train's default folding (8 in-process ranks,
# TP2·CP2·PP2 / EP4) on every core against the same model at --world-size 1 pinned to one core
# (taskset), both without recomputation. Prints the median tokens/s of each (steps 4… of each
# run, over REPS alternating runs) and their ratio; the ideal ratio is the core count.
#   bench/parallel_efficiency.sh [extra moefold-train flags]
#   STEPS=30 REPS=3 MOEFOLD_BUILD=build bench/parallel_efficiency.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD=${MOEFOLD_BUILD:-build}
STEPS=${STEPS:-30}
REPS=${REPS:-3}
TRAIN="$BUILD/bin/moefold-train"
[ -x "$TRAIN" ] || { echo "parallel_efficiency: $TRAIN is missing (build moefold_train first)" >&2; exit 2; }
command -v taskset >/dev/null || { echo "parallel_efficiency: taskset is missing (apt-get install util-linux)" >&2; exit 2; }
CORES=$(nproc)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moefold-efficiency.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Median tokens/s of one run's steps after the third (warm buffers, warm caches).
run() {  # name cpus [flags]
  local name=$1 cpus=$2
  shift 2
  taskset -c "$cpus" "$TRAIN" --quiet --eval-iters 0 --train-iters "$STEPS" \
    --output-dir "$WORK/out" --log-json "$WORK/$name.jsonl" "$@" >/dev/null
  python3 - "$WORK/$name.jsonl" <<'EOF'
import json, statistics, sys
rates = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1])][3:]
print(statistics.median(rates))
EOF
}

echo "parallel efficiency: $STEPS steps per run, $REPS runs each, $CORES cores ($(date -u +%FT%TZ))"
folded=() serial=()
for ((r = 1; r <= REPS; ++r)); do
  folded+=("$(run folded "0-$((CORES - 1))" "$@")")
  serial+=("$(run serial 0 --world-size 1 "$@")")
  echo "  run $r: folded ${folded[-1]} tokens/s on $CORES cores, 1 rank ${serial[-1]} tokens/s on 1 core"
done
python3 - "$CORES" "${folded[*]}" "${serial[*]}" <<'EOF'
import statistics, sys
cores = int(sys.argv[1])
f = statistics.median(map(float, sys.argv[2].split()))
s = statistics.median(map(float, sys.argv[3].split()))
print(f"median: folded {f:.0f} tokens/s, 1 rank on 1 core {s:.0f} tokens/s")
print(f"parallel efficiency (folded / 1 rank on 1 core): {f / s:.2f}  (ideal {cores})")
EOF
