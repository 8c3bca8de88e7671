#!/usr/bin/env bash
# Builds moefold and runs its tests: `scripts/test.sh [ctest arguments...]`.
# Installs the Debian packages it needs when they are missing.
# Without ctest arguments it then runs the sanitizer and fuzzing phases, each in a build
# directory of its own next to $MOEFOLD_BUILD (skip one with MOEFOLD_SKIP_TSAN=1,
# MOEFOLD_SKIP_ASAN=1 or MOEFOLD_SKIP_FUZZ=1), and prints every phase's elapsed time.
set -euo pipefail
start=$(date +%s)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

timings=()
phase_start=$start
# Ends the phase that began at $phase_start: records and prints its elapsed time.
phase_done() {
  local now
  now=$(date +%s)
  timings+=("$(printf '  %-18s %5d s' "$1" $((now - phase_start)))")
  echo "moefold: $1 took $((now - phase_start)) s"
  phase_start=$now
}
# The test executables of a configured build directory (so a sanitizer build compiles what its
# tests run, not the header and compile-fail checks).
test_targets() { sed -n 's/^build \(test_[A-Za-z0-9_]*\): phony.*/\1/p' "$1/build.ninja"; }
# Configures a CPU-only sanitizer build directory $1 with the remaining arguments. -O1 with
# line tables (-g1): the sanitizers' recommended level, full stack traces, and about half the
# compile time of -O2 -g (the sanitizer builds are most of this script's time on 2 cores).
configure_sanitized() {
  local dir=$1
  shift
  MOEFOLD_BUILD="$dir" moefold_configure -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
      -DMOEFOLD_ENABLE_CUDA=OFF -DMOEFOLD_ENABLE_MPI=OFF -DMOEFOLD_ENABLE_NCCL=OFF \
      -DMOEFOLD_BUILD_BENCHMARKS=OFF "$@" >/dev/null
}

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
phase_done "configure+build"

status=0
(cd "$MOEFOLD_BUILD" && ctest --output-on-failure -j "$MOEFOLD_JOBS" "$@") || status=$?
phase_done "ctest"

# ThreadSanitizer: the in-process world's own tests, and a 64-rank moefold-train run
# (train.tsan.world64).
if [ "${MOEFOLD_SKIP_TSAN:-0}" != 1 ] && [ $# -eq 0 ]; then
  tsan_build="$MOEFOLD_BUILD-tsan"
  configure_sanitized "$tsan_build" -DMOEFOLD_SANITIZER=thread
  cmake --build "$tsan_build" -j "$MOEFOLD_JOBS" --target test_comm_inproc moefold_train
  (cd "$tsan_build" && TSAN_OPTIONS=halt_on_error=1 ctest --output-on-failure -j "$MOEFOLD_JOBS" \
      -R '^(test_comm_inproc|train\.tsan\.world64)') || status=$?
  phase_done "tsan"
fi

# AddressSanitizer + UndefinedBehaviorSanitizer (LeakSanitizer included): the cpu-labelled
# suite, but the checks that only compile (headers, compile-fail: no code runs) and the mesh's
# exhaustive factorization sweep (pure rank algebra, ~0.5 s normally but 500 s under ASan on 2
# busy cores; the fuzz phase covers FoldedMapping::from under ASan instead) and the whole
# moefold-train runs of test_train_demo (dozens of training runs; the in-process world's runs are
# covered under ThreadSanitizer by train.tsan.world64, bad inputs by test_bad_inputs here) but the
# serial-vs-folded equality. This build runs every layer on ShuffledCpu (exec/shuffled_cpu.hpp):
# op bodies in a scrambled index order, so a body that depends on iteration order (a race on a
# GPU) fails the suite here.
if [ "${MOEFOLD_SKIP_ASAN:-0}" != 1 ] && [ $# -eq 0 ]; then
  asan_build="$MOEFOLD_BUILD-asan"
  configure_sanitized "$asan_build" -DMOEFOLD_SANITIZER=address,undefined \
      -DMOEFOLD_TEST_EXECUTION=ShuffledCpu
  # shellcheck disable=SC2046
  cmake --build "$asan_build" -j "$MOEFOLD_JOBS" --target $(test_targets "$asan_build")
  (cd "$asan_build" && ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      ctest --output-on-failure -j "$MOEFOLD_JOBS" -L '^cpu$' \
      -E '^(headers\.|compile_fail\.|test_mesh:every factorization of every world size|test_train_demo)') \
      || status=$?
  (cd "$asan_build" && ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      ctest --output-on-failure --no-tests=error \
      -R '^test_train_demo:every folding trains with the serial') \
      || status=$?
  phase_done "asan+ubsan (ShuffledCpu)"
fi

# libFuzzer (clang): each target replays its committed corpus test/fuzz/corpus/<target>/, then
# fuzzes for a short while (test/fuzz/CMakeLists.txt).
if [ "${MOEFOLD_SKIP_FUZZ:-0}" != 1 ] && [ $# -eq 0 ]; then
  fuzz_build="$MOEFOLD_BUILD-fuzz"
  configure_sanitized "$fuzz_build" -DCMAKE_CXX_COMPILER=clang++-14 \
      -DMOEFOLD_SANITIZER=address,undefined -DMOEFOLD_BUILD_FUZZERS=ON \
      -DMOEFOLD_BUILD_EXAMPLES=OFF -DMOEFOLD_INSTALL=OFF
  cmake --build "$fuzz_build" -j "$MOEFOLD_JOBS" --target fuzz
  (cd "$fuzz_build" && ctest --output-on-failure -j "$MOEFOLD_JOBS" -L '^fuzz$') || status=$?
  phase_done "fuzz"
fi

echo "moefold: phases"
printf '%s\n' "${timings[@]}"
echo "moefold: scripts/test.sh took $(( $(date +%s) - start )) s"
exit $status
