#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"

// Device memory for Buffer<T, CudaSpace> (core/buffer.hpp). No fmt in .cu files (see device.cu).

namespace moefold {
inline namespace v0 {
namespace cuda {

void* allocate(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t const status = cudaMalloc(&p, bytes);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    throw error(errc::unavailable, "cuda::allocate: cudaMalloc of " + std::to_string(bytes) +
                                       " bytes failed: " + cudaGetErrorString(status));
  }
  return p;
}

void deallocate(void* p) noexcept {
  if (p != nullptr) (void)cudaFree(p);
}

}  // namespace cuda
}  // namespace v0
}  // namespace moefold
