#!/usr/bin/env bash
# moefold side by side with PyTorch eager on one core (not part of CI: torch is too large).
# Installs pinned torch and transformers from PyPI into a virtual environment (the one
# scripts/check-hf.sh uses), then, each pinned to core 0 with one thread:
#   1. the demo model: moefold-train --world-size 1 against transformers' MixtralForCausalLM
#      with the same weights (a moefold-train checkpoint converted by `moefold convert --to hf`),
#      both training a global batch of 16 × 64 tokens in microbatches of 2 with AdamW;
#   2. the MoE layer alone at T 16384, H 512, F 1024, 8 experts top-2, forward + backward:
#      bench_experts_grouped_gemm's BM_MoELayerFwdBwdOneRank against MixtralSparseMoeBlock.
# Prints tokens/s of each and the ratio moefold / PyTorch; docs/benchmarks.md records it.
#   bench/peers/peers.sh           (MOEFOLD_HF_VENV: the venv; STEPS: demo steps, default 12)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/common.sh"

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.24.0
VENV=${MOEFOLD_HF_VENV:-$MOEFOLD_BUILD/hf-venv}
STEPS=${STEPS:-12}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moefold-peers.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { echo "peers: python3 -m venv failed (apt-get install python3-venv)"; exit 1; }
fi
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION"
PY="$VENV/bin/python"
echo "peers: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'), one thread on core 0"

moefold_configure >/dev/null
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS" --target moefold_train moefold_cli bench_experts_grouped_gemm >/dev/null
TRAIN="$MOEFOLD_BUILD/bin/moefold-train"
one_core=(taskset -c 0 env OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MOEFOLD_BLAS_THREADS=1)

# 1. The demo model. Its weights as a Hugging Face checkpoint: one step saved, converted.
"$TRAIN" --world-size 1 --train-iters 1 --eval-iters 0 --quiet --save "$WORK/ckpt" \
         --output-dir "$WORK/out" >/dev/null
"$MOEFOLD_BUILD/bin/moefold" convert --to hf "$WORK/ckpt" "$WORK/hf" >/dev/null
"${one_core[@]}" "$TRAIN" --world-size 1 --train-iters "$STEPS" --eval-iters 0 --quiet \
                 --output-dir "$WORK/out" --log-json "$WORK/moefold.jsonl" >/dev/null
MOEFOLD_DEMO=$("$PY" -c 'import json, statistics, sys
r = [json.loads(l)["tokens_per_s"] for l in open(sys.argv[1])][2:]
print(f"{statistics.median(r):.1f}")' "$WORK/moefold.jsonl")
TORCH_DEMO=$("${one_core[@]}" "$PY" "$MOEFOLD_ROOT/bench/peers/torch_side.py" demo "$WORK/hf" "$STEPS")
"$PY" -c "print(f'peers: demo model training: moefold-train {$MOEFOLD_DEMO:.0f} tokens/s, PyTorch eager {$TORCH_DEMO:.0f} tokens/s: moefold / PyTorch = {$MOEFOLD_DEMO / $TORCH_DEMO:.2f}')"

# 2. The MoE layer alone.
"${one_core[@]}" "$MOEFOLD_BUILD/bin/bench_experts_grouped_gemm" \
  --benchmark_filter='BM_MoELayerFwdBwdOneRank/16384/512/1024' --benchmark_format=json \
  > "$WORK/moe.json"
MOEFOLD_MOE=$("$PY" -c 'import json, sys
b = json.load(open(sys.argv[1]))["benchmarks"][0]
print("%.1f" % b["tokens_per_s"])' "$WORK/moe.json")
TORCH_MOE=$("${one_core[@]}" "$PY" "$MOEFOLD_ROOT/bench/peers/torch_side.py" moe 16384 512 1024)
"$PY" -c "print(f'peers: MoE layer fwd+bwd (T 16384, H 512, F 1024, 8 experts top-2): moefold {$MOEFOLD_MOE:.0f} tokens/s, PyTorch eager {$TORCH_MOE:.0f} tokens/s: moefold / PyTorch = {$MOEFOLD_MOE / $TORCH_MOE:.2f}')"
