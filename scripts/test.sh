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

status=0
(cd "$MOEFOLD_BUILD" && ctest --output-on-failure -j "$MOEFOLD_JOBS" "$@") || status=$?

# The in-process world under ThreadSanitizer (CPU-only subset; MOEFOLD_SKIP_TSAN=1 skips it).
if [ "${MOEFOLD_SKIP_TSAN:-0}" != 1 ] && [ $# -eq 0 ]; then
  tsan_build="$MOEFOLD_BUILD-tsan"
  MOEFOLD_BUILD="$tsan_build" moefold_configure -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DMOEFOLD_SANITIZER=thread -DMOEFOLD_ENABLE_CUDA=OFF -DMOEFOLD_ENABLE_MPI=OFF \
      -DMOEFOLD_ENABLE_NCCL=OFF -DMOEFOLD_BUILD_BENCHMARKS=OFF >/dev/null
  cmake --build "$tsan_build" -j "$MOEFOLD_JOBS" --target test_comm_inproc
  (cd "$tsan_build" && TSAN_OPTIONS=halt_on_error=1 ctest --output-on-failure -j "$MOEFOLD_JOBS" \
      -R '^test_comm_inproc') || status=$?
fi
echo "moefold: scripts/test.sh took $(( $(date +%s) - start )) s"
exit $status
