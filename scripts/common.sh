# Shared by scripts/test.sh and scripts/demo.sh: Debian packages and the CMake configure step.
# shellcheck shell=bash

MOEFOLD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MOEFOLD_BUILD=${MOEFOLD_BUILD:-$MOEFOLD_ROOT/build}
MOEFOLD_JOBS=${MOEFOLD_JOBS:-$(nproc 2>/dev/null || echo 2)}
MOEFOLD_PACKAGES=(cmake g++ ninja-build ccache catch2 libfmt-dev libcli11-dev nlohmann-json3-dev
                  libopenmpi-dev openmpi-bin libopenblas-dev libbenchmark-dev fortunes
                  clang-14 libclang-rt-14-dev  # clang-14 + its runtime: the libFuzzer targets
                  libsentencepiece-dev sentencepiece pkg-config)  # moefold-train's SentencePiece tokens

# Installs the Debian packages that are missing (as root, or through sudo).
moefold_ensure_packages() {
  local missing=()
  for p in "${MOEFOLD_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "moefold: installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
}

# Configures the build directory (Release, Ninja, ccache when present).
moefold_configure() {
  local launcher=()
  if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  cmake -S "$MOEFOLD_ROOT" -B "$MOEFOLD_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        "${launcher[@]}" "$@"
}
