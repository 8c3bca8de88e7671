#pragma once
// The personalized-exchange pattern of the all-to-all tests: rank q sends (q + 2·d) mod 3
// elements to rank d (uneven, with zeros), element k of that block is q·10000 + d·100 + k, so
// a received value names its sender, its receiver and its place.

#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "comm/rank_checks.hpp"

namespace moefold::test {

struct ExchangePattern {
  int size = 0;
  int me = 0;
  std::vector<std::int64_t> send_counts, recv_counts;
  std::vector<double> send;

  static std::int64_t count(int q, int d) { return static_cast<std::int64_t>((q + 2 * d) % 3); }
  static double value(int q, int d, std::int64_t k) {
    return q * 10000.0 + d * 100.0 + static_cast<double>(k);
  }

  ExchangePattern(int p, int rank) : size(p), me(rank) {
    for (int d = 0; d < p; ++d) {
      send_counts.push_back(count(me, d));
      recv_counts.push_back(count(d, me));
      for (std::int64_t k = 0; k < count(me, d); ++k) send.push_back(value(me, d, k));
    }
  }
  std::size_t recv_size() const {
    return static_cast<std::size_t>(
        std::accumulate(recv_counts.begin(), recv_counts.end(), std::int64_t{0}));
  }
  std::span<double const> send_span() const { return send; }
  std::span<std::int64_t const> sc() const { return send_counts; }
  std::span<std::int64_t const> rc() const { return recv_counts; }

  /// Checks the block received from rank q.
  void check_block(int q, std::span<double const> got, RankChecks& checks,
                   std::string_view what) const {
    checks.equal(static_cast<std::int64_t>(got.size()), count(q, me),
                 fmt::format("{}: size of the block from rank {}", what, q));
    for (std::size_t k = 0; k < got.size(); ++k)
      checks.equal(got[k], value(q, me, static_cast<std::int64_t>(k)),
                   fmt::format("{} from rank {} [{}]", what, q, k));
  }
  /// Checks a receive buffer packed in rank order.
  void check_recv(std::span<double const> recv, RankChecks& checks, std::string_view what) const {
    checks.equal(recv.size(), recv_size(), fmt::format("{}: receive size", what));
    if (recv.size() != recv_size()) return;
    std::size_t offset = 0;
    for (int q = 0; q < size; ++q) {
      auto const n = static_cast<std::size_t>(count(q, me));
      check_block(q, recv.subspan(offset, n), checks, what);
      offset += n;
    }
  }
  /// Bytes this rank sends to and receives from other ranks.
  std::uint64_t bytes_sent() const { return others(send_counts); }
  std::uint64_t bytes_received() const { return others(recv_counts); }

 private:
  std::uint64_t others(std::vector<std::int64_t> const& c) const {
    std::uint64_t b = 0;
    for (int d = 0; d < size; ++d)
      if (d != me) b += static_cast<std::uint64_t>(c[static_cast<std::size_t>(d)]) * sizeof(double);
    return b;
  }
};

}  // namespace moefold::test
