// A consumer of moefold: builds a folding, checks a group, and calls into each component it
// linked.
#include <cstdio>

#include "moefold/mesh/folded_mapping.hpp"
#if CONSUMER_WITH_MPI
#include "moefold/comm/mpi/environment.hpp"
#endif
#if CONSUMER_WITH_CUDA
#include "moefold/exec/cuda_device.hpp"
#endif
#if CONSUMER_WITH_NCCL
#include "moefold/comm/nccl_info.hpp"
#endif

int main() {
  auto const fold =
      moefold::FoldedMapping::from({.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 2});
  bool ok = fold.group_of(moefold::Group::ep, 5) == std::vector<int>{1, 3, 5, 7};
#if CONSUMER_WITH_MPI
  ok = ok && !moefold::mpi::Environment::active();
#endif
#if CONSUMER_WITH_CUDA
  ok = ok && moefold::cuda::device_count() >= 0;
#endif
#if CONSUMER_WITH_NCCL
  ok = ok && moefold::nccl::runtime_version() > 0;
#endif
  std::printf("moefold consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
