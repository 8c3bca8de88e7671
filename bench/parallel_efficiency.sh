#!/usr/bin/env bash
# The folded step's parallel efficiency: moefold-train's default folding (8 in-process ranks,
# TP2·CP2·PP2 / EP4) on every core against the same model at --world-size 1 pinned to one core
# (taskset), both without recomputation. Prints the median tokens/s of each (steps 4… of each
# run, over REPS alternating runs) and their ratio; the ideal ratio is the core count.
# Also the load-robust part of that ratio: the CPU time per token (the process's, all threads,
# `cpu_s` of --log-json) of the folded run over the 1-rank run's — the overhead of folding,
# ideal 1 — and the cores the folded run kept busy (CPU time ÷ wall time, ideal the core
# count): tokens/s ratio ≈ cores busy ÷ CPU-time ratio. Other processes on the machine lower
# the tokens/s ratio and the cores busy; the CPU-time ratio moves less.
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

# "tokens/s CPU-seconds-per-token cores-busy" of one run: the median tokens/s of its steps after
# the third (warm buffers, warm caches), and their CPU and wall time summed.
run() {  # name cpus [flags]
  local name=$1 cpus=$2
  shift 2
  taskset -c "$cpus" "$TRAIN" --quiet --eval-iters 0 --train-iters "$STEPS" \
    --output-dir "$WORK/out" --log-json "$WORK/$name.jsonl" "$@" >/dev/null
  python3 - "$WORK/$name.jsonl" <<'EOF'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1])][3:]
rate = statistics.median(s["tokens_per_s"] for s in steps)
if "cpu_s" not in steps[0]:  # a moefold-train from before cpu_s
  print(rate, "nan nan")
  sys.exit()
tokens = sum(s["tokens_per_s"] * s["seconds"] for s in steps)
cpu = sum(s["cpu_s"] for s in steps)
wall = sum(s["seconds"] for s in steps)
print(rate, cpu / tokens, cpu / wall)
EOF
}

echo "parallel efficiency: $STEPS steps per run, $REPS runs each, $CORES cores ($(date -u +%FT%TZ))"
folded=() serial=()
for ((r = 1; r <= REPS; ++r)); do
  folded+=("$(run folded "0-$((CORES - 1))" "$@")")
  serial+=("$(run serial 0 --world-size 1 "$@")")
  read -r ft fc fb <<<"${folded[-1]}"
  read -r st sc sb <<<"${serial[-1]}"
  echo "  run $r: $(python3 -c "nan = float('nan'); print(f'folded {$ft:.0f} tokens/s on $CORES \
cores ({$fb:.2f} busy, {$fc * 1e6:.0f} µs CPU/token), 1 rank {$st:.0f} tokens/s on 1 core \
({$sb:.2f} busy, {$sc * 1e6:.0f} µs CPU/token)')")"
done
python3 - "$CORES" "${folded[@]}" -- "${serial[@]}" <<'EOF'
import statistics, sys
cores = int(sys.argv[1])
cut = sys.argv.index("--")
folded = [list(map(float, r.split())) for r in sys.argv[2:cut]]
serial = [list(map(float, r.split())) for r in sys.argv[cut + 1:]]
med = lambda rows, k: statistics.median(r[k] for r in rows)
f, s = med(folded, 0), med(serial, 0)
print(f"median: folded {f:.0f} tokens/s, 1 rank on 1 core {s:.0f} tokens/s")
print(f"parallel efficiency (folded / 1 rank on 1 core): {f / s:.2f}  (ideal {cores})")
print(f"CPU time per token, folded / 1 rank: {med(folded, 1) / med(serial, 1):.2f}  (ideal 1); "
      f"cores busy: folded {med(folded, 2):.2f} (ideal {cores}), 1 rank {med(serial, 2):.2f}")
EOF
