#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "moefold/exec/cuda_device.hpp"

// fmt 9's headers do not compile under nvcc 13 in C++20 mode (consteval format strings), so
// this translation unit formats with snprintf; keep fmt out of .cu files.

namespace moefold {
inline namespace v0 {
namespace cuda {

int device_count() noexcept {
  int n = 0;
  // Any error (no driver: cudaErrorInsufficientDriver; no device: cudaErrorNoDevice) means 0.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string describe_devices() {
  int n = 0;
  cudaError_t const status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("no usable CUDA device: ") + cudaGetErrorString(status) + " (" +
           std::to_string(static_cast<int>(status)) + ")";
  }
  std::string out;
  for (int d = 0; d < n; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    char line[512];
    std::snprintf(line, sizeof line, "%d: %s, sm_%d%d, %.1f GiB\n", d, prop.name, prop.major,
                  prop.minor, static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
    out += line;
  }
  return out;
}

int runtime_version() noexcept { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace v0
}  // namespace moefold
