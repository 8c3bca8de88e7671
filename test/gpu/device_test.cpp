// The CUDA component links and runs: it reports the devices, or skips (77) without one.
#include <cstdio>

#include "moefold/exec/cuda_device.hpp"

int main() {
  int const n = moefold::cuda::device_count();
  std::printf("CUDA runtime %d\n%s\n", moefold::cuda::runtime_version(),
              moefold::cuda::describe_devices().c_str());
  if (n == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  return moefold::cuda::describe_devices().find("sm_") != std::string::npos ? 0 : 1;
}
