// The non-blocking all-to-all (`start_all_to_all_v` → `wait`) and the zero-copy receive side
// (`exchange_view`), one test body per behaviour, run on each backend against the independent
// reference of exchange_pattern.hpp.

#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "comm/backends.hpp"
#include "comm/exchange_pattern.hpp"
#include "moefold/comm/communicator.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::ExchangePattern;
using moefold::test::expect_clean;
using moefold::test::RankChecks;

namespace {

constexpr int kSizes[] = {1, 2, 3, 4, 8};

/// A computation to overlap with the exchange: Σ i·rank over `n` terms (exact in double).
double busy_sum(int rank, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(i) * rank;
  return s;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE(
    "start_all_to_all_v then wait gives the blocking form's result, with "
    "work and another group's collective in between",
    "[comm][nonblocking]", Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      auto half = comm.split(comm.rank() % 2, comm.rank());
      ExchangePattern const x(comm.size(), comm.rank());
      std::vector<double> blocking(x.recv_size());
      comm.all_to_all_v(x.send_span(), x.sc(), std::span<double>(blocking), x.rc());
      comm.reset_traffic();
      for (int round = 0; round < 3; ++round) {
        std::vector<double> recv(x.recv_size(), -1.0);
        auto handle =
            comm.start_all_to_all_v(x.send_span(), x.sc(), std::span<double>(recv), x.rc());
        // Overlapped: local work and a collective on another group.
        double const local = busy_sum(comm.rank(), 1000 + 100 * round);
        std::vector<double> partial{local};
        half.all_reduce(std::span<double>(partial));
        double expected_partial = 0;
        for (int r = comm.rank() % 2; r < comm.size(); r += 2)
          expected_partial += busy_sum(r, 1000 + 100 * round);
        checks.equal(partial[0], expected_partial,
                     fmt::format("round {}: the overlapped all_reduce", round));
        handle.wait();
        x.check_recv(recv, checks, fmt::format("round {}: started all_to_all_v", round));
        checks.check(recv == blocking,
                     fmt::format("round {}: equals the blocking all_to_all_v", round));
      }
      auto const& t = comm.traffic()[CollectiveKind::all_to_all];
      checks.equal(t.calls, std::uint64_t{3}, "all_to_all calls");
      checks.equal(t.bytes_sent, 3 * x.bytes_sent(), "all_to_all bytes sent");
      checks.equal(t.bytes_received, 3 * x.bytes_received(), "all_to_all bytes received");
    });
  }
}

TEMPLATE_LIST_TEST_CASE("a collective on a group with a started one not waited for is refused",
                        "[comm][nonblocking]", Backends) {
  expect_clean<TestType>(4, [](auto& comm, RankChecks& checks) {
    ExchangePattern const x(comm.size(), comm.rank());
    std::vector<double> recv(x.recv_size());
    auto handle = comm.start_all_to_all_v(x.send_span(), x.sc(), std::span<double>(recv), x.rc());
    std::string const msg = test::error_of([&] { comm.barrier(); });
    checks.check(
        msg.find("barrier on") != std::string::npos &&
            msg.find("while the all_to_all_v this rank (world rank") != std::string::npos &&
            msg.find("is not waited for: call wait() on its handle first") != std::string::npos,
        "the refusal names the call, the started collective and the fix: " + msg);
    handle.wait();
    x.check_recv(recv, checks, "the started all_to_all_v after the refusal");
    std::string const twice = test::error_of([&] { handle.wait(); });
    checks.check(twice.find("already waited for") != std::string::npos, "a second wait: " + twice);
    comm.barrier();  // the group is usable again
  });
}

TEMPLATE_LIST_TEST_CASE("exchange_view hands each rank the blocks its peers send it",
                        "[comm][view]", Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      for (int round = 0; round < 3; ++round) {
        // A fresh send buffer each round, freed after the call: peers must be done with it.
        auto x = std::make_unique<ExchangePattern>(comm.size(), comm.rank());
        for (auto& v : x->send) v += round;
        int calls = 0;
        double weighted = 0;  // a consumer fused with the receive: Σ_q (q+1) · Σ block_q
        comm.exchange_view(
            x->send_span(), x->sc(), x->rc(), [&](std::span<std::span<double const> const> blocks) {
              ++calls;
              checks.equal(blocks.size(), static_cast<std::size_t>(comm.size()), "blocks");
              for (int q = 0; q < comm.size(); ++q)
                for (double v : blocks[static_cast<std::size_t>(q)]) weighted += (q + 1) * v;
            });
        checks.equal(calls, 1, "calls of the callback");
        double expected = 0;
        for (int q = 0; q < comm.size(); ++q)
          for (std::int64_t k = 0; k < ExchangePattern::count(q, comm.rank()); ++k)
            expected += (q + 1) * (ExchangePattern::value(q, comm.rank(), k) + round);
        checks.equal(weighted, expected,
                     fmt::format("round {}: weighted sum of the viewed blocks", round));
      }
      ExchangePattern const x(comm.size(), comm.rank());
      comm.exchange_view(
          x.send_span(), x.sc(), x.rc(), [&](std::span<std::span<double const> const> blocks) {
            for (int q = 0; q < comm.size(); ++q)
              x.check_block(q, blocks[static_cast<std::size_t>(q)], checks, "exchange_view");
          });
    });
  }
}

TEMPLATE_LIST_TEST_CASE("exchange_view rejects counts that do not match the buffer, naming them",
                        "[comm][view]", Backends) {
  expect_clean<TestType>(2, [](auto& comm, RankChecks& checks) {
    std::vector<float> a(3);
    std::vector<std::int64_t> counts{1, 1};
    std::string const msg = test::error_of([&] {
      comm.exchange_view(std::span<float const>(a), std::span<std::int64_t const>(counts),
                         std::span<std::int64_t const>(counts), [](auto) {});
    });
    checks.check(msg.starts_with("exchange_view: the sum of send_counts (send size) is 2 but the "
                                 "buffer holds 3 elements"),
                 "the error: " + msg);
  });
}

TEMPLATE_LIST_TEST_CASE(
    "a started all_to_all_v advances while its rank waits in another group, "
    "so a peer in the blocking form is not held up",
    "[comm][nonblocking]", Backends) {
  for (int n : {2, 3, 8}) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      // Rank 0 starts the exchange, then all-reduces with rank 1, which is still in the
      // blocking exchange: rank 1 can leave it only once rank 0 has taken its part.
      auto pair = comm.split(comm.rank() < 2 ? 0 : 1, comm.rank());
      ExchangePattern const x(comm.size(), comm.rank());
      std::vector<double> recv(x.recv_size());
      std::vector<double> one{1.0};
      if (comm.rank() == 0) {
        auto handle =
            comm.start_all_to_all_v(x.send_span(), x.sc(), std::span<double>(recv), x.rc());
        pair.all_reduce(std::span<double>(one));
        handle.wait();
      } else {
        comm.all_to_all_v(x.send_span(), x.sc(), std::span<double>(recv), x.rc());
        pair.all_reduce(std::span<double>(one));
      }
      checks.equal(one[0], static_cast<double>(pair.size()), "the pair's all_reduce");
      x.check_recv(recv, checks, "all_to_all_v");
    });
  }
}
