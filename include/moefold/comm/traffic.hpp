#pragma once
/// \file
/// Per-communicator traffic counters: calls and payload bytes per collective kind.
///
/// Bytes are counted by the collective's data dependencies, not by a backend's algorithm:
/// `sent` is the bytes of this rank's input that other ranks need, `received` the bytes of other
/// ranks' inputs that this rank needs. E.g. all_to_all_v: Σ_{p≠me} send_counts[p] sent;
/// all_gather_v: own count × (n−1) sent, Σ_{p≠me} counts[p] received; all_reduce: (n−1)·bytes
/// both ways. Summed over a group, sent equals received.

#include <array>
#include <cstdint>
#include <string_view>

namespace moefold {
inline namespace v0 {

/// The collectives a communicator counts.
enum class CollectiveKind : std::uint8_t {
  all_reduce,
  broadcast,
  all_gather,
  reduce_scatter,
  all_to_all,
  point_to_point,
  barrier,
  split,
};
inline constexpr int kCollectiveKindCount = 8;

constexpr std::string_view name(CollectiveKind k) noexcept {
  constexpr std::array<std::string_view, kCollectiveKindCount> names{
      "all_reduce", "broadcast", "all_gather", "reduce_scatter",
      "all_to_all", "point_to_point", "barrier", "split"};
  return names[static_cast<std::size_t>(k)];
}

/// Counters of one communicator on one rank.
class Traffic {
 public:
  struct Counter {
    std::uint64_t calls = 0;
    std::uint64_t bytes_sent = 0;
    std::uint64_t bytes_received = 0;
  };

  void add(CollectiveKind k, std::uint64_t sent, std::uint64_t received) noexcept {
    auto& c = counters_[static_cast<std::size_t>(k)];
    ++c.calls;
    c.bytes_sent += sent;
    c.bytes_received += received;
  }
  Counter const& operator[](CollectiveKind k) const noexcept {
    return counters_[static_cast<std::size_t>(k)];
  }
  std::uint64_t total_sent() const noexcept {
    std::uint64_t s = 0;
    for (auto const& c : counters_) s += c.bytes_sent;
    return s;
  }
  std::uint64_t total_received() const noexcept {
    std::uint64_t s = 0;
    for (auto const& c : counters_) s += c.bytes_received;
    return s;
  }
  void reset() noexcept { counters_ = {}; }

 private:
  std::array<Counter, kCollectiveKindCount> counters_{};
};

}  // namespace v0
}  // namespace moefold
