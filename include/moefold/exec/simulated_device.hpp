#pragma once
/// \file
/// `SimulatedDevice`: a test instance whose memory the type system treats as a device's. Its
/// space, `SimulatedDeviceSpace`, is not host-accessible: a layer that reads its data on the
/// host without `copy(exec, device view, host view)` does not compile (views of it convert to
/// no span, vector or host view). Its memory is host memory underneath, so its bodies, GEMMs,
/// scans and sorts run on the CPU (bodies in `ShuffledCpu`'s scrambled order), and fresh
/// buffers hold a poison pattern (all bits set: NaN, −1), as uninitialized device memory would.
/// Every `copy` between it and the host is counted (calls and bytes, each direction), so a test
/// can assert what a real device run would move across PCIe — e.g. that one MoE forward copies
/// only the routing's counts to the host (docs/execution.md, "Where data meets the host").
///
///   SimulatedDevice dev;
///   auto x = dev.allocate<float>(n);                // Buffer<float, SimulatedDeviceSpace>
///   copy<float>(dev, host_view, x.view());          // counted: host → device
///   dev.traffic().to_host.calls                     // device → host copies so far

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string_view>
#include <type_traits>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/exec/shuffled_cpu.hpp"

namespace moefold {
inline namespace v0 {

/// Host memory typed as a device's (see `SimulatedDevice`).
struct SimulatedDeviceSpace {
  static constexpr std::string_view name = "simulated-device";
  static constexpr bool host_accessible = false;
  /// Memory filled with 0xFF bytes (NaN floats, −1 integers): a read before the first write
  /// shows.
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = std::malloc(bytes);
    if (p == nullptr) throw std::bad_alloc();
    std::memset(p, 0xFF, bytes);
    return p;
  }
  static void deallocate(void* p) noexcept { std::free(p); }
};

/// Copies counted by a `SimulatedDevice` and its copies.
struct DeviceTraffic {
  struct Direction {
    std::int64_t calls = 0;
    std::int64_t bytes = 0;
  };
  Direction to_host;    ///< device → host
  Direction to_device;  ///< host → device
};

/// The simulated device instance (test instance; see the file comment).
class SimulatedDevice {
 public:
  using memory_space = SimulatedDeviceSpace;
  static constexpr std::string_view name = "simulated-device";

  template <class T>
  Buffer<T, SimulatedDeviceSpace> allocate(std::int64_t n) const {
    MOEFOLD_EXPECTS(n >= 0, "SimulatedDevice::allocate: negative element count {}", n);
    return Buffer<T, SimulatedDeviceSpace>(n);
  }
  void fence() const noexcept {}
  template <class Body>
  void for_each(std::int64_t n, Body const& body) const {
    ShuffledCpu{}.for_each(n, body);
  }
  template <class Body>
  void for_each_row(std::int64_t rows, Body const& body) const {
    ShuffledCpu{}.for_each_row(rows, body);
  }

  /// The copies counted since construction (shared by the copies of this instance).
  DeviceTraffic const& traffic() const noexcept { return *traffic_; }
  void reset_traffic() noexcept { *traffic_ = DeviceTraffic{}; }
  /// Counts one copy of `bytes` across the bus (the counters are shared state, not the
  /// instance's value: a const instance counts too).
  void count_copy(bool to_host, std::int64_t bytes) const noexcept {
    auto& d = to_host ? traffic_->to_host : traffic_->to_device;
    ++d.calls;
    d.bytes += bytes;
  }

 private:
  std::shared_ptr<DeviceTraffic> traffic_ = std::make_shared<DeviceTraffic>();
};

namespace detail {
/// The host view of a simulated-device view (the same memory).
template <class T, class S>
View<T, HostSpace> as_host(View<T, S> v) noexcept {
  return View<T, HostSpace>(v.data(), v.rows(), v.cols(), v.ld());
}
template <class S>
inline constexpr bool sim_or_host_v =
    std::is_same_v<S, HostSpace> || std::is_same_v<S, SimulatedDeviceSpace>;
}  // namespace detail

/// dst = src between the host and the simulated device (either way, or within one); copies
/// that cross are counted in `exec.traffic()`.
template <class T, class Src, class S1, class S2>
  requires(std::is_same_v<std::remove_const_t<Src>, T> && detail::sim_or_host_v<S1> &&
           detail::sim_or_host_v<S2>)
void copy(SimulatedDevice const& exec, View<Src, S1> src, View<T, S2> dst) {
  copy<T>(Cpu{}, detail::as_host(View<T const, S1>(src)), detail::as_host(dst));
  if constexpr (!std::is_same_v<S1, S2>)
    exec.count_copy(std::is_same_v<S2, HostSpace>, src.size() * static_cast<std::int64_t>(sizeof(T)));
}

template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
void gemm(SimulatedDevice const&, Trans ta, Trans tb, T alpha,
          std::type_identity_t<View<T const, SimulatedDeviceSpace>> a,
          std::type_identity_t<View<T const, SimulatedDeviceSpace>> b, T beta,
          std::type_identity_t<View<T, SimulatedDeviceSpace>> c) {
  gemm<T>(Cpu{}, ta, tb, alpha, detail::as_host(a), detail::as_host(b), beta, detail::as_host(c));
}
template <class T, class TC>
  requires(std::is_same_v<T, bf16> && (std::is_same_v<TC, float> || std::is_same_v<TC, bf16>))
void gemm(SimulatedDevice const&, Trans ta, Trans tb, float alpha,
          std::type_identity_t<View<T const, SimulatedDeviceSpace>> a,
          std::type_identity_t<View<T const, SimulatedDeviceSpace>> b, float beta,
          View<TC, SimulatedDeviceSpace> c) {
  gemm<T, TC>(Cpu{}, ta, tb, alpha, detail::as_host(a), detail::as_host(b), beta,
              detail::as_host(c));
}
template <class I>
void exclusive_scan(SimulatedDevice const&, std::type_identity_t<View<I const, SimulatedDeviceSpace>> in,
                    View<I, SimulatedDeviceSpace> out) {
  exclusive_scan<I>(Cpu{}, detail::as_host(in), detail::as_host(out));
}
template <class K>
void histogram(SimulatedDevice const&, View<K const, SimulatedDeviceSpace> keys,
               View<std::int64_t, SimulatedDeviceSpace> counts) {
  histogram<K>(Cpu{}, detail::as_host(keys), detail::as_host(counts));
}
template <class K>
std::int64_t stable_sort_by_key(SimulatedDevice const&, View<K const, SimulatedDeviceSpace> keys,
                                std::int64_t num_keys, View<std::int64_t, SimulatedDeviceSpace> order) {
  return stable_sort_by_key<K>(Cpu{}, detail::as_host(keys), num_keys, detail::as_host(order));
}

static_assert(ExecutionInstance<SimulatedDevice> && !HostInstance<SimulatedDevice>);

}  // namespace v0
}  // namespace moefold
