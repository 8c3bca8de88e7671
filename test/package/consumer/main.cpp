// A consumer of moefold through its one include: builds a folding, checks a group, and calls
// into each component it linked.
#include <cstdio>
#include <vector>

#include <moefold/moefold.hpp>

int main() {
  auto const fold =
      moefold::FoldedMapping::from({.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 2});
  bool ok = fold.group_of(moefold::Group::ep, 5) == std::vector<int>{1, 3, 5, 7};
  // The one include reaches the training tier too.
  ok = ok && moefold::DecoderModelConfig{}.rope_base == 10000.0;
#if MOEFOLD_HAS_MPI
  ok = ok && !moefold::mpi::Environment::active();
#endif
#if MOEFOLD_HAS_CUDA
  ok = ok && moefold::cuda::device_count() >= 0;
#endif
#if MOEFOLD_HAS_NCCL
  ok = ok && moefold::nccl::runtime_version() > 0;
#endif
#if MOEFOLD_HAS_INTEROP
  {  // a safetensors file in memory: 8 bytes of header length, the header, 4 bytes of data
    moefold::SafetensorsWriter w;
    std::vector<float> const one{1.0f};
    w.add("x", {1}, std::span<float const>(one));
    auto const bytes = w.bytes();
    ok = ok && bytes.size() > 12 && (bytes.size() - 4) % 8 == 0;
  }
#endif
  std::printf("moefold consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
