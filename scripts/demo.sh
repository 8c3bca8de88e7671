#!/usr/bin/env bash
# The main job: until the folded training demo lands, prints the process groups of the folding
# attention TP2·CP2·PP2 / MoE EP4·ETP1 on 8 ranks. Extra arguments go to `moefold groups`.
# Installs the Debian packages it needs when they are missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

moefold_ensure_packages
moefold_configure >/dev/null
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS" --target moefold_cli >/dev/null
"$MOEFOLD_BUILD/bin/moefold" groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1 "$@"
