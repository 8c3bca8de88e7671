#pragma once
/// \file
/// Memory spaces are types: a view or buffer names where its elements live, so that host memory
/// passed to a device op (or the reverse) does not compile. `HostSpace` is ordinary memory;
/// `CudaSpace` is CUDA device memory (allocated by the `Cuda` instance of component
/// `moefold::cuda`). A space that is not host-accessible names how its memory is allocated
/// (`Space::allocate(bytes)`, `Space::deallocate(p)`): `Buffer` uses them.

#include <concepts>
#include <cstddef>
#include <string_view>

namespace moefold {
inline namespace v0 {

namespace cuda {
/// Device memory of the current CUDA device (`cudaMalloc`); throws `moefold::error` on failure.
/// Defined in component `moefold::cuda` (cuda/memory.cu).
void* allocate(std::size_t bytes);
/// Frees memory from `allocate` (null is ignored).
void deallocate(void* p) noexcept;
}  // namespace cuda

/// Host (CPU) memory.
struct HostSpace {
  static constexpr std::string_view name = "host";
  static constexpr bool host_accessible = true;
};

/// CUDA device memory.
struct CudaSpace {
  static constexpr std::string_view name = "cuda";
  static constexpr bool host_accessible = false;
  /// Uninitialized memory for `Buffer<T, CudaSpace>`.
  static void* allocate(std::size_t bytes) { return cuda::allocate(bytes); }
  static void deallocate(void* p) noexcept { cuda::deallocate(p); }
};

/// A memory space: names itself and says whether host code may dereference its pointers.
template <class S>
concept MemorySpace = requires {
  { S::name } -> std::convertible_to<std::string_view>;
  { S::host_accessible } -> std::convertible_to<bool>;
};

static_assert(MemorySpace<HostSpace> && MemorySpace<CudaSpace>);

}  // namespace v0
}  // namespace moefold
