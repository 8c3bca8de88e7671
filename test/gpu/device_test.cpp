// The CUDA component links and runs: it reports the devices and allocates device memory through
// Buffer<T, CudaSpace>, or skips (77) without a device.
#include <cstdio>

#include "moefold/core/buffer.hpp"
#include "moefold/exec/cuda_device.hpp"

int main() {
  int const n = moefold::cuda::device_count();
  std::printf("CUDA runtime %d\n%s\n", moefold::cuda::runtime_version(),
              moefold::cuda::describe_devices().c_str());
  if (n == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  // Device memory through Buffer<T, CudaSpace> (cuda/memory.cu): allocated and freed.
  {
    moefold::Buffer<float, moefold::CudaSpace> b(1 << 20);
    if (b.data() == nullptr || b.size() != (1u << 20)) return 1;
    moefold::View<float, moefold::CudaSpace> v = b.view(1024, 1024);
    if (v.rows() != 1024 || v.data() != b.data()) return 1;
  }
  return moefold::cuda::describe_devices().find("sm_") != std::string::npos ? 0 : 1;
}
