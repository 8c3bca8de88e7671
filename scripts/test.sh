#!/usr/bin/env bash
# Builds moefold and runs its tests: `scripts/test.sh [ctest arguments...]`.
# Installs the Debian packages it needs when they are missing.
set -euo pipefail
start=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

moefold_ensure_packages
moefold_configure
cmake --build "$MOEFOLD_BUILD" -j "$MOEFOLD_JOBS"

# CUDA must not silently switch off: where nvcc exists, the CUDA code must have been compiled.
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  if ! grep -q '#define MOEFOLD_HAS_CUDA 1' "$MOEFOLD_BUILD/include/moefold/config.hpp"; then
    echo "moefold: nvcc exists but the build has MOEFOLD_HAS_CUDA 0" >&2
    exit 1
  fi
fi

cd "$MOEFOLD_BUILD"
status=0
ctest --output-on-failure -j "$MOEFOLD_JOBS" "$@" || status=$?
echo "moefold: scripts/test.sh took $(( $(date +%s) - start )) s"
exit $status
