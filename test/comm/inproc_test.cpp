// What is specific to the in-process world: a failing rank aborts the world, a missing rank
// times out with a message naming it, mismatched collectives are detected, and sums are
// bitwise reproducible because they run in rank order.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <numeric>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "support/catch.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {

/// Runs `fn` on `n` ranks; returns the message of the error `run` rethrows ("" when none) and
/// each rank's own error (message and category).
struct Outcome {
  std::string rethrown;
  std::vector<std::string> messages;
  std::vector<errc> categories;
};

template <class Fn>
Outcome run_catching(int n, Fn fn, std::chrono::milliseconds timeout = 10s) {
  Outcome o;
  o.messages.resize(static_cast<std::size_t>(n));
  o.categories.resize(static_cast<std::size_t>(n), errc::internal);
  try {
    inproc::run(
        n,
        [&](inproc::Communicator& c) {
          try {
            fn(c);
          } catch (error const& e) {
            o.messages[static_cast<std::size_t>(c.rank())] = e.what();
            o.categories[static_cast<std::size_t>(c.rank())] = e.category();
            throw;
          } catch (std::exception const& e) {
            o.messages[static_cast<std::size_t>(c.rank())] = e.what();
            throw;
          }
        },
        {.timeout = timeout});
  } catch (std::exception const& e) {
    o.rethrown = e.what();
  }
  return o;
}

}  // namespace

TEST_CASE("a rank that throws aborts the world, run rethrows its error") {
  auto const o = run_catching(6, [](inproc::Communicator& c) {
    c.barrier();
    if (c.rank() == 2) throw std::runtime_error("boom on purpose");
    c.barrier();  // the others wait here for rank 2 …
    c.barrier();
  });
  CHECK(o.rethrown == "boom on purpose");
  for (int r : {0, 1, 3, 4, 5}) {
    INFO("rank " << r);
    CHECK(o.categories[static_cast<std::size_t>(r)] == errc::aborted);
    CHECK_THAT(o.messages[static_cast<std::size_t>(r)],
               Contains("because rank 2 failed: boom on purpose"));
  }
}

TEST_CASE("a rank that never arrives makes the world fail within the timeout, naming it") {
  auto const start = std::chrono::steady_clock::now();
  auto const o = run_catching(
      8,
      [](inproc::Communicator& c) {
        if (c.rank() == 3) {
          std::this_thread::sleep_for(900ms);  // stuck past the timeout, then late
        }
        c.barrier();
      },
      300ms);
  auto const elapsed = std::chrono::steady_clock::now() - start;
  CHECK_THAT(o.rethrown, Contains("inproc: collective barrier over the group of world ranks "
                                  "0 1 2 3 4 5 6 7 timed out after 300 ms: ranks 0 1 2 4 5 6 7 "
                                  "arrived, rank 3 did not"));
  CHECK(elapsed < 60s);  // not a timing threshold: a hang would never get here
  int timeouts = 0;
  for (int r = 0; r < 8; ++r)
    if (r != 3) {
      auto const cat = o.categories[static_cast<std::size_t>(r)];
      CHECK((cat == errc::timeout || cat == errc::aborted));
      timeouts += cat == errc::timeout;
    }
  CHECK(timeouts >= 1);
}

TEST_CASE("a rank that has returned from its function fails its waiting peers at once, named") {
  // The timeout is far away: the failure comes from rank 3's return, not from the clock.
  auto const o = run_catching(4, [](inproc::Communicator& c) {
    if (c.rank() == 3) return;  // never calls the barrier
    c.barrier();
  });
  // Who else had arrived is a snapshot (ranks 1 and 2 may not have come yet); rank 3 is named.
  CHECK_THAT(o.rethrown, Contains("inproc: collective barrier over the group of world ranks "
                                  "0 1 2 3 cannot complete: "));
  CHECK_THAT(o.rethrown, Contains("did not (rank 3 has returned from its rank function)"));
  CHECK(o.messages[3].empty());
  for (int r = 0; r < 3; ++r) {
    auto const cat = o.categories[static_cast<std::size_t>(r)];
    CHECK((cat == errc::communication || cat == errc::aborted));
  }
}

TEST_CASE("a receive whose message never comes times out naming both ranks") {
  auto const o = run_catching(
      2,
      [](inproc::Communicator& c) {
        std::vector<float> x(3);
        if (c.rank() == 0) std::this_thread::sleep_for(600ms);  // alive, but never sends
        if (c.rank() == 1) c.recv(std::span<float>(x), 0, 5);
      },
      200ms);
  CHECK_THAT(o.rethrown, Contains("timed out after 200 ms: world rank 1 waited for a message "
                                  "from world rank 0 (tag 5) that never came"));
}

TEST_CASE("a receive from a rank that has returned from its function fails at once, naming it") {
  auto const o = run_catching(2, [](inproc::Communicator& c) {
    std::vector<float> x(3);
    if (c.rank() == 1) c.recv(std::span<float>(x), 0, 5);
  });
  CHECK_THAT(o.rethrown, Contains("cannot complete (world rank 0 has returned from its rank "
                                  "function): world rank 1 waited for a message from world rank "
                                  "0 (tag 5) that never came"));
}

TEST_CASE("the world's default timeout is Megatron's, 10 minutes") {
  CHECK(inproc::Options{}.timeout == std::chrono::minutes(10));
}

TEST_CASE("mismatched collectives fail on every rank with a message naming both calls") {
  auto const o = run_catching(2, [](inproc::Communicator& c) {
    std::vector<float> x(4, 1.0f);
    if (c.rank() == 0) c.all_reduce(std::span<float>(x));
    else c.broadcast(std::span<float>(x), 0);
  });
  CHECK_THAT(o.rethrown, Contains("mismatched collectives on the group of world ranks 0 1"));
  CHECK_THAT(o.rethrown, Contains("all_reduce<float>"));
  CHECK_THAT(o.rethrown, Contains("broadcast<float>"));
}

TEST_CASE("all_to_all_v counts that do not match between peers are an error") {
  auto const o = run_catching(2, [](inproc::Communicator& c) {
    std::vector<std::int64_t> send_counts{1, 1}, recv_counts{1, c.rank() == 0 ? 2 : 1};
    std::vector<float> send(2), recv(static_cast<std::size_t>(recv_counts[0] + recv_counts[1]));
    c.all_to_all_v(std::span<float const>(send), std::span<std::int64_t const>(send_counts),
                   std::span<float>(recv), std::span<std::int64_t const>(recv_counts));
  });
  CHECK_THAT(o.rethrown, Contains("world rank 1 sends 1 elements to world rank 0, which expects 2"));
}

TEST_CASE("a message of the wrong size is an error, not silent truncation") {
  auto const o = run_catching(2, [](inproc::Communicator& c) {
    std::vector<double> x(c.rank() == 0 ? 2 : 3);
    if (c.rank() == 0) c.send(std::span<double const>(x), 1);
    else c.recv(std::span<double>(x), 0);
  });
  CHECK_THAT(o.rethrown, Contains("expected 24 bytes from world rank 0 (tag 0) but the message has 16"));
}

TEST_CASE("collectives on a null communicator are rejected") {
  inproc::Communicator null;
  CHECK_FALSE(null.valid());
  CHECK(null.size() == 0);
  std::vector<float> x(1);
  CHECK_THROWS_WITH(null.all_reduce(std::span<float>(x)), Contains("on a null communicator"));
  CHECK_THROWS_WITH(null.all_gather(std::span<float const>(x), std::span<float>(x)),
                    Contains("all_gather_v on a null communicator"));
  CHECK_THROWS_WITH(null.split(0, 0), Contains("split on a null communicator"));
}

TEST_CASE("sums run in rank order, so they are bitwise reproducible and equal the serial sum") {
  // Values whose float sum depends on the order of addition.
  auto contribution = [](int r, std::size_t i) {
    float const big = (r % 2 == 0 ? 1.0f : -1.0f) * 1.0e8f;
    return big + static_cast<float>(r) * 0.37f + static_cast<float>(i) * 1.1e-3f;
  };
  constexpr int kRanks = 7;
  constexpr std::size_t kCount = 64;
  std::vector<float> serial(kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    float acc = contribution(0, i);
    for (int r = 1; r < kRanks; ++r) acc += contribution(r, i);
    serial[i] = acc;
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::vector<std::vector<float>> results(kRanks);
    inproc::run(kRanks, [&](inproc::Communicator& c) {
      std::vector<float> x(kCount);
      for (std::size_t i = 0; i < kCount; ++i) x[i] = contribution(c.rank(), i);
      c.all_reduce(std::span<float>(x));
      results[static_cast<std::size_t>(c.rank())] = x;
    });
    for (auto const& r : results) CHECK(r == serial);
  }
}

TEST_CASE("back-to-back collectives below and above the eager limit: senders reuse their buffers") {
  // A rank leaves a small collective without waiting for its readers (its payload was staged)
  // and clobbers its buffers at once; large payloads are read in place. Every value checked.
  constexpr int kRanks = 8;
  constexpr int kRounds = 120;
  std::vector<int> bad(kRanks, 0);
  inproc::run(kRanks, [&](inproc::Communicator& c) {
    int const me = c.rank();
    auto value = [](int round, int from, int to, std::size_t j) {
      return static_cast<float>(round * 100000 + from * 1000 + to * 100) + static_cast<float>(j);
    };
    // Elements per (sender, receiver) block: small on even rounds (≤ 17 per peer), above the
    // 64 KiB limit in total on odd ones (≥ 2100 floats per peer, ≥ 67 KB per rank).
    auto block = [](int round, int from, int to) {
      auto const k = static_cast<std::size_t>(round + 3 * from + 5 * to);
      return round % 2 == 0 ? 1 + k % 17 : 2100 + k % 300;
    };
    for (int round = 0; round < kRounds; ++round) {
      std::vector<std::int64_t> send_counts(kRanks), recv_counts(kRanks);
      std::vector<float> send;
      for (int q = 0; q < kRanks; ++q) {
        send_counts[static_cast<std::size_t>(q)] = static_cast<std::int64_t>(block(round, me, q));
        recv_counts[static_cast<std::size_t>(q)] = static_cast<std::int64_t>(block(round, q, me));
        for (std::size_t j = 0; j < block(round, me, q); ++j)
          send.push_back(value(round, me, q, j));
      }
      std::vector<float> recv(
          static_cast<std::size_t>(std::accumulate(recv_counts.begin(), recv_counts.end(), 0L)));
      c.all_to_all_v(std::span<float const>(send), std::span<std::int64_t const>(send_counts),
                     std::span<float>(recv), std::span<std::int64_t const>(recv_counts));
      std::fill(send.begin(), send.end(), -1.0f);  // clobbered as soon as the call returns
      std::size_t at = 0;
      for (int q = 0; q < kRanks; ++q)
        for (std::size_t j = 0; j < block(round, q, me); ++j)
          bad[static_cast<std::size_t>(me)] += recv[at++] != value(round, q, me, j);
      // An exact sum (integers) written in place, and a gather of per-rank lengths.
      std::vector<std::int64_t> sum(block(round, 0, 0), me + round);
      c.all_reduce(std::span<std::int64_t>(sum));
      for (auto s : sum) bad[static_cast<std::size_t>(me)] += s != 28 + 8 * round;
      std::vector<std::int64_t> lengths(kRanks);
      for (int q = 0; q < kRanks; ++q)
        lengths[static_cast<std::size_t>(q)] = static_cast<std::int64_t>(block(round, q, 1));
      std::vector<float> mine(block(round, me, 1), static_cast<float>(me + round));
      std::vector<float> all(static_cast<std::size_t>(std::accumulate(lengths.begin(), lengths.end(), 0L)));
      c.all_gather_v(std::span<float const>(mine), std::span<float>(all),
                     std::span<std::int64_t const>(lengths));
      std::fill(mine.begin(), mine.end(), -1.0f);
      at = 0;
      for (int q = 0; q < kRanks; ++q)
        for (std::int64_t j = 0; j < lengths[static_cast<std::size_t>(q)]; ++j)
          bad[static_cast<std::size_t>(me)] += all[at++] != static_cast<float>(q + round);
    }
  });
  CHECK(bad == std::vector<int>(kRanks, 0));
}

TEST_CASE("traffic counters count payload bytes per collective kind, per communicator") {
  std::vector<Traffic> traffic(4);
  inproc::run(4, [&](inproc::Communicator& c) {
    std::vector<double> x(10);
    c.all_reduce(std::span<double>(x));
    c.broadcast(std::span<double>(x), 1);
    auto sub = c.split(c.rank() / 2, 0);
    sub.barrier();
    traffic[static_cast<std::size_t>(c.rank())] = c.traffic();
  });
  for (int r = 0; r < 4; ++r) {
    auto const& t = traffic[static_cast<std::size_t>(r)];
    CHECK(t[CollectiveKind::all_reduce].calls == 1);
    CHECK(t[CollectiveKind::all_reduce].bytes_sent == 3 * 10 * sizeof(double));
    CHECK(t[CollectiveKind::broadcast].bytes_sent == (r == 1 ? 3 * 80u : 0u));
    CHECK(t[CollectiveKind::broadcast].bytes_received == (r == 1 ? 0u : 80u));
    CHECK(t[CollectiveKind::split].calls == 1);
    CHECK(t[CollectiveKind::barrier].calls == 0);  // the barrier ran on the split communicator
  }
}

TEST_CASE("inproc::run rejects an empty world") {
  CHECK_THROWS_WITH(inproc::run(0, [](inproc::Communicator&) {}),
                    Contains("needs at least one rank (got 0)"));
}
