#!/usr/bin/env bash
# The main job: trains a small Mixtral-style model on byte-level English text (Debian's
# 'fortunes', BSD license) folded over 8 in-process ranks as attention TP2·CP2·PP2 and MoE
# EP4·ETP1, 1F1B. Prints a progress line per step and a summary; leaves the loss curve
# (loss.svg, loss.csv) in ./moefold-train-out. Extra arguments go to moefold-train
# (e.g. --train-iters 50, --world-size 1, --save ckpt). Installs missing Debian packages.
#   scripts/demo.sh --tokenizer sp [ARGS]   trains a SentencePiece unigram model of 1024 pieces on
#                                           the corpus first (spm_train; build/sp/fortunes.model)
#                                           and trains on its tokens (the summary's bits per byte
#                                           compare with the byte-level run's)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tokenizer=bytes
if [ "${1:-}" = "--tokenizer" ]; then
  tokenizer=${2:?--tokenizer needs bytes or sp}
  shift 2
fi
moefold_ensure_packages
moefold_configure >/dev/null
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS" --target moefold_train >/dev/null
case "$tokenizer" in
  bytes) exec "$MOEFOLD_BUILD/bin/moefold-train" "$@" ;;
  sp)
    model="$MOEFOLD_BUILD/sp/fortunes.model"
    if [ ! -f "$model" ]; then
      mkdir -p "$MOEFOLD_BUILD/sp"
      # The corpus moefold-train reads: the fortune files (no extension), in name order.
      find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.*' | sort | xargs cat \
        > "$MOEFOLD_BUILD/sp/fortunes.txt"
      spm_train --input="$MOEFOLD_BUILD/sp/fortunes.txt" --model_prefix="$MOEFOLD_BUILD/sp/fortunes" \
                --vocab_size=1024 --model_type=unigram --character_coverage=1.0 \
                --byte_fallback=true --minloglevel=2 >/dev/null
    fi
    exec "$MOEFOLD_BUILD/bin/moefold-train" --tokenizer-type GPTSentencePieceTokenizer \
         --tokenizer-model "$model" "$@" ;;
  *) echo "demo.sh: --tokenizer must be bytes or sp (got '$tokenizer')" >&2; exit 2 ;;
esac
