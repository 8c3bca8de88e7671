#pragma once
/// \file
/// Execution policies name where data lives and where work runs. `Cpu` runs on the calling
/// thread over host memory; `Cuda` (exec/cuda.hpp) runs on a CUDA stream over device memory.

#include <string_view>

namespace moefold {
inline namespace v0 {

/// Host (CPU) memory.
struct HostSpace {
  static constexpr std::string_view name = "host";
};
/// CUDA device memory.
struct DeviceSpace {
  static constexpr std::string_view name = "device";
};

/// Runs on the calling CPU thread over host memory; GEMMs go through BLAS (exec/blas.hpp).
struct Cpu {
  using memory_space = HostSpace;
  static constexpr std::string_view name = "cpu";
};

/// An execution policy: names its memory space and itself.
template <class E>
concept ExecutionPolicy = requires {
  typename E::memory_space;
  { E::name } -> std::convertible_to<std::string_view>;
};

static_assert(ExecutionPolicy<Cpu>);

}  // namespace v0
}  // namespace moefold
