#!/usr/bin/env bash
# The main job: trains a small Mixtral-style model on byte-level English text (Debian's
# 'fortunes', BSD license) folded over 8 in-process ranks as attention TP2·CP2·PP2 and MoE
# EP4·ETP1, 1F1B. Prints a progress line per step and a summary; leaves the loss curve
# (loss.svg, loss.csv) in ./moefold-train-out. Extra arguments go to moefold-train
# (e.g. --train-iters 50, --world-size 1, --save ckpt). Installs missing Debian packages.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

moefold_ensure_packages
moefold_configure >/dev/null
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS" --target moefold_train >/dev/null
"$MOEFOLD_BUILD/bin/moefold-train" "$@"
