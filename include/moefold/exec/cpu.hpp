#pragma once
/// \file
/// `Cpu`: the host execution instance. It runs bodies on the calling thread, in index order,
/// over host memory; GEMMs go through BLAS (exec/blas.hpp). Every layer of moefold is written
/// once against an instance (exec/instance.hpp lists the interface); `Cuda` (component
/// `moefold::cuda`) is the device one.
///
///   moefold::Cpu exec;
///   auto y = exec.allocate<float>(n);                        // Buffer<float, HostSpace>
///   for_each(exec, n, ops::Scale<float>{x, y.data(), 2.f});  // body(i) for i in [0, n)
///   gemm(exec, Trans::no, Trans::yes, 1.f, a, b, 0.f, c);    // views: C = A·Bᵀ

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {

/// Runs on the calling CPU thread over host memory.
struct Cpu {
  using memory_space = HostSpace;
  static constexpr std::string_view name = "cpu";

  /// n value-initialized elements of host memory.
  template <class T>
  Buffer<T, HostSpace> allocate(std::int64_t n) const {
    MOEFOLD_EXPECTS(n >= 0, "Cpu::allocate: negative element count {}", n);
    return Buffer<T, HostSpace>(n);
  }
  /// Waits for the instance's work: nothing to wait for on the calling thread.
  void fence() const noexcept {}
  /// body(i) for every i in [0, n), in order. Bodies must not depend on that order (ShuffledCpu
  /// checks it), nor write what another index reads.
  template <class Body>
  void for_each(std::int64_t n, Body const& body) const {
    for (std::int64_t i = 0; i < n; ++i) body(i);
  }
  /// body(r) for every row r in [0, rows): a body that owns a whole row (a reduction along it,
  /// a softmax). On a device one row is one thread block.
  template <class Body>
  void for_each_row(std::int64_t rows, Body const& body) const {
    for (std::int64_t r = 0; r < rows; ++r) body(r);
  }
};

/// dst = src, element by element (same shape; both host views for the Cpu instance).
template <class T>
void copy(Cpu const&, std::type_identity_t<View<T const>> src, View<T, HostSpace> dst) {
  MOEFOLD_EXPECTS(src.rows() == dst.rows() && src.cols() == dst.cols(),
                  "copy: source is {}×{}, destination {}×{}", src.rows(), src.cols(), dst.rows(),
                  dst.cols());
  if (src.empty()) return;
  if (src.contiguous() && dst.contiguous()) {
    std::memcpy(dst.data(), src.data(), static_cast<std::size_t>(src.size()) * sizeof(T));
    return;
  }
  for (std::int64_t r = 0; r < src.rows(); ++r)
    std::memcpy(dst.row(r).data(), src.row(r).data(),
                static_cast<std::size_t>(src.cols()) * sizeof(T));
}

namespace detail {
/// k of C = op(A)·op(B) on views; throws when the shapes do not match.
template <class A, class B, class C>
std::int64_t gemm_k(Trans ta, Trans tb, A const& a, B const& b, C const& c) {
  std::int64_t const m = c.rows(), n = c.cols();
  std::int64_t const k = ta == Trans::no ? a.cols() : a.rows();
  MOEFOLD_EXPECTS((ta == Trans::no ? a.rows() : a.cols()) == m,
                  "gemm: op(A) has {} rows, C has {}", ta == Trans::no ? a.rows() : a.cols(), m);
  MOEFOLD_EXPECTS((tb == Trans::no ? b.rows() : b.cols()) == k &&
                      (tb == Trans::no ? b.cols() : b.rows()) == n,
                  "gemm: op(B) is {}×{}, expected {}×{}", tb == Trans::no ? b.rows() : b.cols(),
                  tb == Trans::no ? b.cols() : b.rows(), k, n);
  return k;
}
}  // namespace detail

/// C = alpha · op(A) · op(B) + beta · C on views (row-major; sizes from the views: C is m×n,
/// op(A) m×k, op(B) k×n). float or double.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
void gemm(Cpu const&, Trans ta, Trans tb, T alpha, std::type_identity_t<View<T const>> a,
          std::type_identity_t<View<T const>> b, T beta, std::type_identity_t<View<T>> c) {
  std::int64_t const k = detail::gemm_k(ta, tb, a, b, c);
  gemm<T>(ta, tb, c.rows(), c.cols(), k, alpha, a.data(), a.ld(), b.data(), b.ld(), beta,
          c.data(), c.ld());
}
/// The same with bf16 A and B, accumulated in FP32: C float (a main gradient, FP32 logits) or
/// bf16 (rounded once); alpha and beta in FP32.
template <class T, class TC>
  requires(std::is_same_v<T, bf16> && (std::is_same_v<TC, float> || std::is_same_v<TC, bf16>))
void gemm(Cpu const&, Trans ta, Trans tb, float alpha, std::type_identity_t<View<T const>> a,
          std::type_identity_t<View<T const>> b, float beta, View<TC, HostSpace> c) {
  std::int64_t const k = detail::gemm_k(ta, tb, a, b, c);
  gemm<TC>(ta, tb, c.rows(), c.cols(), k, alpha, a.data(), a.ld(), b.data(), b.ld(), beta,
           c.data(), c.ld());
}

/// out[i] = Σ_{j<i} in[j] (out[0] = 0); in and out may be the same view.
template <class I>
void exclusive_scan(Cpu const&, std::type_identity_t<View<I const>> in, View<I, HostSpace> out) {
  MOEFOLD_EXPECTS(in.size() == out.size(), "exclusive_scan: {} inputs for {} outputs", in.size(),
                  out.size());
  I sum{};
  for (std::int64_t i = 0; i < in.size(); ++i) {
    I const v = in[i];
    out[i] = sum;
    sum += v;
  }
}

/// counts[b] = how many keys equal b, for b in [0, counts.size()); keys outside are not counted
/// (a negative key marks an entry that takes no part).
template <class K>
void histogram(Cpu const&, View<K const, HostSpace> keys, View<std::int64_t, HostSpace> counts) {
  std::fill(counts.data(), counts.data() + counts.size(), std::int64_t{0});
  for (std::int64_t i = 0; i < keys.size(); ++i) {
    auto const k = static_cast<std::int64_t>(keys[i]);
    if (k >= 0 && k < counts.size()) ++counts[k];
  }
}

/// The stable order of the entries by key (a stable partition by expert): `order[j]` is the
/// index of the j-th entry when entries with keys in [0, num_keys) are sorted by key, ties in
/// index order; entries with other keys are left out (`order` holds the kept ones). Returns how
/// many were kept.
template <class K>
std::int64_t stable_sort_by_key(Cpu const&, View<K const, HostSpace> keys, std::int64_t num_keys,
                                View<std::int64_t, HostSpace> order) {
  MOEFOLD_EXPECTS(num_keys >= 0, "stable_sort_by_key: negative key count {}", num_keys);
  Buffer<std::int64_t> next(num_keys + 1);
  for (std::int64_t i = 0; i < keys.size(); ++i) {
    auto const k = static_cast<std::int64_t>(keys[i]);
    if (k >= 0 && k < num_keys) ++next[static_cast<std::size_t>(k + 1)];
  }
  for (std::int64_t k = 0; k < num_keys; ++k)
    next[static_cast<std::size_t>(k + 1)] += next[static_cast<std::size_t>(k)];
  std::int64_t const kept = next[static_cast<std::size_t>(num_keys)];
  MOEFOLD_EXPECTS(order.size() >= kept, "stable_sort_by_key: {} kept entries, order holds {}",
                  kept, order.size());
  for (std::int64_t i = 0; i < keys.size(); ++i) {
    auto const k = static_cast<std::int64_t>(keys[i]);
    if (k >= 0 && k < num_keys) order[next[static_cast<std::size_t>(k)]++] = i;
  }
  return kept;
}

static_assert(ExecutionInstance<Cpu> && HostInstance<Cpu>);

}  // namespace v0
}  // namespace moefold
