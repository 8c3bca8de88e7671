#pragma once
/// \file
/// `ShuffledCpu`: a test instance that runs `for_each` and `for_each_row` bodies in a scrambled
/// index order (a different order on every call). A layer written correctly against the
/// instance interface gives the same results as on `Cpu`; a body that depends on the order in
/// which indices run — which would race on a GPU — gives different ones. Everything else
/// (memory, GEMMs, scans, sorts) is `Cpu`'s.

#include <atomic>
#include <cstdint>
#include <string_view>
#include <vector>

#include "moefold/exec/cpu.hpp"

namespace moefold {
inline namespace v0 {

struct ShuffledCpu : Cpu {
  static constexpr std::string_view name = "shuffled-cpu";

  template <class Body>
  void for_each(std::int64_t n, Body const& body) const {
    run_scrambled(n, body);
  }
  template <class Body>
  void for_each_row(std::int64_t rows, Body const& body) const {
    run_scrambled(rows, body);
  }

 private:
  /// One counter for every body type and instance, so that no call repeats the previous order.
  static std::uint64_t next_call() noexcept {
    static std::atomic<std::uint64_t> calls{0};
    return calls.fetch_add(1, std::memory_order_relaxed);
  }
  /// Visits [0, n) as j ↦ (a·k + c) mod n, k = j or n−1−j (reversed on every other call), with
  /// a coprime to n and c ≠ 0: never the ascending order for n ≥ 2.
  template <class Body>
  static void run_scrambled(std::int64_t n, Body const& body) {
    if (n <= 0) return;
    if (n == 1) {
      body(0);
      return;
    }
    auto const mix = [](std::uint64_t z) {
      z += 0x9e3779b97f4a7c15ull;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      return z ^ (z >> 31);
    };
    auto const gcd = [](std::uint64_t x, std::uint64_t y) {
      while (y != 0) {
        std::uint64_t const t = x % y;
        x = y;
        y = t;
      }
      return x;
    };
    std::uint64_t const call = next_call();
    auto const un = static_cast<std::uint64_t>(n);
    std::uint64_t a = mix(call) % un;
    if (a == 0) a = 1;
    while (gcd(a, un) != 1) a = a + 1 == un ? 1 : a + 1;
    std::uint64_t const c = 1 + mix(call ^ 0x5bd1e995ull) % (un - 1);  // in [1, n)
    bool const reverse = (call & 1u) != 0;
    for (std::uint64_t j = 0; j < un; ++j) {
      std::uint64_t const k = reverse ? un - 1 - j : j;
      // (a·k + c) mod n without overflow for n < 2^32; larger n rotate by c.
      std::uint64_t const i = un < (1ull << 32) ? (a * k + c) % un : (k + c) % un;
      body(static_cast<std::int64_t>(i));
    }
  }
};

static_assert(ExecutionInstance<ShuffledCpu>);

}  // namespace v0
}  // namespace moefold
