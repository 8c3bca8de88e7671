#!/usr/bin/env bash
# The check against the real library (not part of CI: torch is too large). Installs pinned torch
# and transformers from PyPI into a virtual environment, trains 20 steps of a small Mixtral-style
# model folded as TP2·CP2·PP2/EP4, converts the checkpoint to Hugging Face (moefold convert --to
# hf), loads it with transformers.MixtralForCausalLM.from_pretrained, and compares the LM loss of
# HF's logits on moefold-train's first training batch with moefold-train's own loss on that
# batch (relative difference <= 1e-5, fp32). Then converts back (--from hf) and checks the round
# trip: the same safetensors bytes, and moefold-train's loss on the batch to the last digit.
# Also rewrites the transformers-written fixtures of test/data/hf_mixtral and checks that
# they did not change. docs/interop.md records its output.
#   scripts/check-hf.sh            (MOEFOLD_HF_VENV: the venv, default build/hf-venv)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.24.0
SAFETENSORS_VERSION=0.8.0
VENV=${MOEFOLD_HF_VENV:-$MOEFOLD_BUILD/hf-venv}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moefold-check-hf.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { echo "check-hf: python3 -m venv failed (apt-get install python3-venv)"; exit 1; }
fi
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
                           "safetensors==$SAFETENSORS_VERSION"
PY="$VENV/bin/python"
echo "check-hf: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"

moefold_configure >/dev/null
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS" --target moefold_train moefold_cli >/dev/null
TRAIN="$MOEFOLD_BUILD/bin/moefold-train"
MOEFOLD="$MOEFOLD_BUILD/bin/moefold"

# The corpus: the demo's (Debian's fortunes, the files without extension in name order, as
# moefold-train reads the directory), in one file for the Python side.
moefold_ensure_packages
find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.*' | sort | xargs cat > "$WORK/corpus.txt"
SEED=1234 SEQ=64 GB=16
MODEL=(--num-layers 4 --hidden-size 128 --num-attention-heads 8 --num-query-groups 4
       --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 256 --rotary-base 1000000
       --norm-epsilon 1e-5 --seq-length $SEQ --global-batch-size $GB --micro-batch-size 2
       --seed $SEED --data-path "$WORK/corpus.txt" --quiet --eval-iters 0)

# 1. Train 20 steps under TP2·CP2·PP2/EP4 (the default folding) and save.
"$TRAIN" "${MODEL[@]}" --train-iters 20 --save "$WORK/ckpt" --output-dir "$WORK/out" >/dev/null
# 2. moefold's loss on the first training batch with the trained weights: a --finetune run of
#    --lr 0 starts at iteration 0, so its step 1 is that batch.
loss_of() {  # the step-1 loss of a --finetune --lr 0 run from checkpoint $1
  "$TRAIN" "${MODEL[@]}" --train-iters 1 --lr 0 --min-lr 0 --finetune --load "$1" \
           --output-dir "$WORK/out" --log-json "$WORK/$2.jsonl" >/dev/null
  "$PY" -c 'import json, sys; print(repr(json.loads(open(sys.argv[1]).readline())["loss"]))' "$WORK/$2.jsonl"
}
MOEFOLD_LOSS=$(loss_of "$WORK/ckpt" trained)
# 3. Convert, load with transformers, compare.
"$MOEFOLD" convert --to hf "$WORK/ckpt" "$WORK/hf"
HF_LOSS=$("$PY" "$MOEFOLD_ROOT/scripts/check_hf.py" "$WORK/hf" "$WORK/corpus.txt" $SEED $SEQ $GB 2>/dev/null | awk '/^hf_loss/ {print $2}')
REL=$("$PY" -c "a, b = $HF_LOSS, $MOEFOLD_LOSS; print(f'{abs(a - b) / abs(b):.3e}')")
echo "check-hf: loss of the first training batch after 20 steps: moefold-train $MOEFOLD_LOSS, transformers $HF_LOSS, relative difference $REL"
"$PY" -c "import sys; sys.exit(0 if $REL <= 1e-5 else 1)" || { echo "check-hf: FAILED: relative difference $REL > 1e-5"; exit 1; }
# 4. Back to moefold: the same bytes again, the same loss to the last digit.
"$MOEFOLD" convert --from hf "$WORK/hf" "$WORK/back"
"$MOEFOLD" convert --to hf "$WORK/back" "$WORK/hf2" >/dev/null
cmp "$WORK/hf/model.safetensors" "$WORK/hf2/model.safetensors" || { echo "check-hf: FAILED: round trip changed model.safetensors"; exit 1; }
BACK_LOSS=$(loss_of "$WORK/back" back)
[ "$BACK_LOSS" = "$MOEFOLD_LOSS" ] || { echo "check-hf: FAILED: loss after the round trip $BACK_LOSS != $MOEFOLD_LOSS"; exit 1; }
echo "check-hf: round trip moefold -> hf -> moefold -> hf: model.safetensors identical ($(stat -c %s "$WORK/hf/model.safetensors") bytes), loss $BACK_LOSS identical"
# 5. The fixtures: transformers writes them again, byte for byte.
"$PY" "$MOEFOLD_ROOT/scripts/hf_fixture.py" "$WORK/fixture" >/dev/null 2>&1
for layout in classic fused; do
  cmp "$WORK/fixture/$layout/model.safetensors" "$MOEFOLD_ROOT/test/data/hf_mixtral/$layout/model.safetensors" \
    || { echo "check-hf: FAILED: test/data/hf_mixtral/$layout differs from what transformers writes now"; exit 1; }
done
echo "check-hf: test/data/hf_mixtral fixtures match what transformers $TRANSFORMERS_VERSION writes"
echo "check-hf: passed"
