#pragma once
/// \file
/// The execution-instance interface, Kokkos-style: an instance is a value that names its memory
/// space and carries what running needs (`Cpu{}`; `Cuda{device, stream, cuBLAS handle,
/// allocator}` in component `moefold::cuda`). Layers are written once against it:
///
///   allocate   exec.allocate<T>(n) → Buffer<T, Space>
///   fence      exec.fence(): wait for the instance's work
///   for_each   for_each(exec, n, body): body(i) for i in [0, n), in any order
///   for_each_row  for_each_row(exec, rows, body): body(r), a body owning row r
///   copy       copy(exec, src, dst): views of any two spaces the instance can reach
///   gemm       gemm(exec, ta, tb, alpha, A, B, beta, C) on views, FP32 accumulation
///   grouped_gemm  grouped_gemm<Policy>(exec, problems, workspace): exec/grouped_gemm.hpp
///   exclusive_scan, histogram, stable_sort_by_key: the device-wide primitives of the router
///              and the permutation
///
/// Bodies are plain structs of the ops tier (include/moefold/ops/) with a `MOEFOLD_HD`
/// `operator()(std::int64_t)`; they must not depend on the order indices run in.

#include <concepts>
#include <cstdint>
#include <string_view>

#include "moefold/core/buffer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/blas.hpp"

namespace moefold {
inline namespace v0 {

/// body(i) for every i in [0, n), in an order the instance chooses.
template <class Exec, class Body>
void for_each(Exec const& exec, std::int64_t n, Body const& body) {
  exec.for_each(n, body);
}
/// body(r) for every row r in [0, rows), each row owned by one body call.
template <class Exec, class Body>
void for_each_row(Exec const& exec, std::int64_t rows, Body const& body) {
  exec.for_each_row(rows, body);
}

namespace detail {
/// A body the concept checks instances with.
struct probe_body {
  MOEFOLD_HD void operator()(std::int64_t) const noexcept {}
};
}  // namespace detail

/// An execution instance: its memory space, allocation, fences, index-parallel bodies, copies,
/// GEMMs and the primitives the layers need, for float data and int64 counts.
template <class E>
concept ExecutionInstance =
    std::copy_constructible<E> &&
    requires(E const& e, View<float const, typename E::memory_space> ci,
             View<float, typename E::memory_space> o,
             View<std::int64_t const, typename E::memory_space> ki,
             View<std::int64_t, typename E::memory_space> ko) {
      requires MemorySpace<typename E::memory_space>;
      { E::name } -> std::convertible_to<std::string_view>;
      { e.template allocate<float>(std::int64_t{1}) }
          -> std::same_as<Buffer<float, typename E::memory_space>>;
      e.fence();
      e.for_each(std::int64_t{1}, detail::probe_body{});
      e.for_each_row(std::int64_t{1}, detail::probe_body{});
      copy<float>(e, ci, o);
      gemm<float>(e, Trans::no, Trans::yes, 1.0f, ci, ci, 0.0f, o);
      exclusive_scan<std::int64_t>(e, ki, ko);
      histogram<std::int64_t>(e, ki, ko);
      { stable_sort_by_key<std::int64_t>(e, ki, std::int64_t{1}, ko) } -> std::same_as<std::int64_t>;
    };

/// An instance whose memory the host can read: the CPU instances.
template <class E>
concept HostInstance = ExecutionInstance<E> && E::memory_space::host_accessible;

}  // namespace v0
}  // namespace moefold
