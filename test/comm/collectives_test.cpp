// Every collective of the Communicator concept, one test body per behaviour, run on each
// backend: uneven and zero counts, every element type, splits, point-to-point exchange,
// traffic counters. Values are small integers, so sums are exact in any order.

#include <cstdint>
#include <numeric>
#include <span>
#include <vector>
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "comm/exchange_pattern.hpp"
#include "support/error_of.hpp"
#include "moefold/comm/communicator.hpp"

using namespace moefold;
using moefold::test::expect_clean;
using moefold::test::ExchangePattern;
using moefold::test::RankChecks;

namespace {

/// A value that depends on (rank, index) and is exactly representable in every type.
template <class T>
T value(int rank, std::size_t i) {
  return T(static_cast<float>((rank * 7 + static_cast<int>(i) * 3) % 31 - 9));
}

template <class T>
std::string str(T v) {
  if constexpr (std::is_same_v<T, bf16>) return fmt::format("{}", static_cast<float>(v));
  else return fmt::format("{}", v);
}

template <class T>
T reduce(T a, T b, ReduceOp op) {
  auto const x = static_cast<double>(static_cast<float>(a));
  auto const y = static_cast<double>(static_cast<float>(b));
  double r = op == ReduceOp::sum ? x + y : op == ReduceOp::max ? std::max(x, y) : std::min(x, y);
  return T(static_cast<float>(r));
}

/// Uneven counts with zeros: rank p holds (p·3 + salt) mod 4 elements.
std::vector<std::int64_t> uneven_counts(int n, int salt) {
  std::vector<std::int64_t> c(static_cast<std::size_t>(n));
  for (int p = 0; p < n; ++p) c[static_cast<std::size_t>(p)] = (p * 3 + salt) % 4;
  return c;
}

constexpr int kSizes[] = {1, 2, 3, 4, 8};

}  // namespace

TEMPLATE_LIST_TEST_CASE("all_reduce sums, maxes and mins every element type", "[comm]",
                        Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      auto one_type = [&]<class T>(T) {
        for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
          for (std::size_t count : {0u, 1u, 5u, 33u}) {
            std::vector<T> x(count);
            for (std::size_t i = 0; i < count; ++i) x[i] = value<T>(comm.rank(), i);
            comm.all_reduce(std::span<T>(x), op);
            for (std::size_t i = 0; i < count; ++i) {
              T expected = value<T>(0, i);
              for (int r = 1; r < comm.size(); ++r) expected = reduce(expected, value<T>(r, i), op);
              if (!(x[i] == expected)) {
                checks.check(false, fmt::format("all_reduce {} {} count {} [{}]: got {} expected {}",
                                                name(dtype_of<T>()), name(op), count, i, str(x[i]),
                                                str(expected)));
                break;
              }
            }
          }
        }
      };
      one_type(float{});
      one_type(double{});
      one_type(bf16{});
      one_type(std::int32_t{});
      one_type(std::int64_t{});
    });
  }
}

TEMPLATE_LIST_TEST_CASE("broadcast copies the root's data to every rank", "[comm]", Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      for (int root = 0; root < comm.size(); ++root) {
        for (std::size_t count : {0u, 7u}) {
          std::vector<double> x(count, -1.0);
          if (comm.rank() == root)
            for (std::size_t i = 0; i < count; ++i) x[i] = value<double>(root, i);
          comm.broadcast(std::span<double>(x), root);
          for (std::size_t i = 0; i < count; ++i)
            checks.equal(x[i], value<double>(root, i), fmt::format("broadcast root {} [{}]", root, i));
        }
      }
    });
  }
}

TEMPLATE_LIST_TEST_CASE("all_gather and all_gather_v concatenate in rank order", "[comm]",
                        Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      int const p = comm.size();
      // Equal counts.
      std::vector<std::int32_t> mine(3);
      for (std::size_t i = 0; i < 3; ++i) mine[i] = value<std::int32_t>(comm.rank(), i);
      std::vector<std::int32_t> all(static_cast<std::size_t>(3 * p));
      comm.all_gather(std::span<std::int32_t const>(mine), std::span<std::int32_t>(all));
      for (int r = 0; r < p; ++r)
        for (std::size_t i = 0; i < 3; ++i)
          checks.equal(all[static_cast<std::size_t>(r) * 3 + i], value<std::int32_t>(r, i),
                       fmt::format("all_gather from rank {} [{}]", r, i));
      // Uneven counts, zeros included.
      for (int salt : {0, 1, 2}) {
        auto const counts = uneven_counts(p, salt);
        std::vector<float> send(static_cast<std::size_t>(counts[static_cast<std::size_t>(comm.rank())]));
        for (std::size_t i = 0; i < send.size(); ++i) send[i] = value<float>(comm.rank(), i);
        std::vector<float> recv(static_cast<std::size_t>(std::accumulate(counts.begin(), counts.end(), 0)));
        comm.all_gather_v(std::span<float const>(send), std::span<float>(recv),
                          std::span<std::int64_t const>(counts));
        std::size_t k = 0;
        for (int r = 0; r < p; ++r)
          for (std::int64_t i = 0; i < counts[static_cast<std::size_t>(r)]; ++i, ++k)
            checks.equal(recv[k], value<float>(r, static_cast<std::size_t>(i)),
                         fmt::format("all_gather_v salt {} from rank {} [{}]", salt, r, i));
      }
    });
  }
}

TEMPLATE_LIST_TEST_CASE("reduce_scatter and reduce_scatter_v give each rank its reduced segment",
                        "[comm]", Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      int const p = comm.size();
      for (int salt : {0, 3}) {
        auto const counts = uneven_counts(p, salt);
        auto const total = static_cast<std::size_t>(std::accumulate(counts.begin(), counts.end(), 0));
        std::vector<bf16> send(total);
        for (std::size_t i = 0; i < total; ++i) send[i] = value<bf16>(comm.rank(), i);
        std::vector<bf16> recv(static_cast<std::size_t>(counts[static_cast<std::size_t>(comm.rank())]));
        comm.reduce_scatter_v(std::span<bf16 const>(send), std::span<bf16>(recv),
                              std::span<std::int64_t const>(counts), ReduceOp::sum);
        std::size_t const offset = static_cast<std::size_t>(
            std::accumulate(counts.begin(), counts.begin() + comm.rank(), 0));
        for (std::size_t i = 0; i < recv.size(); ++i) {
          float expected = 0;
          for (int r = 0; r < p; ++r) expected += static_cast<float>(value<bf16>(r, offset + i));
          checks.equal(static_cast<float>(recv[i]), expected,
                       fmt::format("reduce_scatter_v salt {} [{}]", salt, i));
        }
      }
      // Equal blocks, max.
      std::vector<std::int64_t> send(static_cast<std::size_t>(2 * p));
      for (std::size_t i = 0; i < send.size(); ++i) send[i] = value<std::int64_t>(comm.rank(), i);
      std::vector<std::int64_t> recv(2);
      comm.reduce_scatter(std::span<std::int64_t const>(send), std::span<std::int64_t>(recv),
                          ReduceOp::max);
      for (std::size_t i = 0; i < 2; ++i) {
        std::int64_t expected = value<std::int64_t>(0, 2 * static_cast<std::size_t>(comm.rank()) + i);
        for (int r = 1; r < p; ++r)
          expected = std::max(expected, value<std::int64_t>(r, 2 * static_cast<std::size_t>(comm.rank()) + i));
        checks.equal(recv[i], expected, fmt::format("reduce_scatter max [{}]", i));
      }
    });
  }
}

TEMPLATE_LIST_TEST_CASE("all_to_all_v delivers each peer's slice, with uneven and zero counts",
                        "[comm]", Backends) {
  for (int n : kSizes) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      ExchangePattern const x(comm.size(), comm.rank());
      std::vector<double> recv(x.recv_size());
      comm.reset_traffic();
      comm.all_to_all_v(x.send_span(), x.sc(), std::span<double>(recv), x.rc());
      x.check_recv(recv, checks, "all_to_all_v");
      // Traffic: what leaves for and arrives from other ranks.
      auto const& t = comm.traffic()[CollectiveKind::all_to_all];
      checks.equal(t.calls, std::uint64_t{1}, "all_to_all calls");
      checks.equal(t.bytes_sent, x.bytes_sent(), "all_to_all bytes sent");
      checks.equal(t.bytes_received, x.bytes_received(), "all_to_all bytes received");
    });
  }
}

TEMPLATE_LIST_TEST_CASE("point-to-point: a ring of sends and a batched pipeline exchange",
                        "[comm]", Backends) {
  for (int n : {2, 3, 4, 8}) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      int const p = comm.size();
      int const me = comm.rank();
      int const next = (me + 1) % p, prev = (me + p - 1) % p;
      // Batched: send to the next rank and receive from the previous one, as a pipeline stage
      // does; with two tags to check matching.
      std::vector<float> out_a(5, static_cast<float>(me)), out_b(2, static_cast<float>(100 + me));
      std::vector<float> in_a(5), in_b(2);
      P2POp const ops[] = {P2POp::recv(std::span<float>(in_b), prev, 7),
                           P2POp::send(std::span<float const>(out_a), next, 3),
                           P2POp::send(std::span<float const>(out_b), next, 7),
                           P2POp::recv(std::span<float>(in_a), prev, 3)};
      comm.exchange(std::span<P2POp const>(ops));
      checks.equal(in_a[4], static_cast<float>(prev), "exchange tag 3");
      checks.equal(in_b[1], static_cast<float>(100 + prev), "exchange tag 7");
      // Plain send/recv in an order that cannot deadlock: even ranks send first.
      std::vector<std::int64_t> token(1, me), got(1, -1);
      if (me % 2 == 0) {
        comm.send(std::span<std::int64_t const>(token), next);
        comm.recv(std::span<std::int64_t>(got), prev);
      } else {
        comm.recv(std::span<std::int64_t>(got), prev);
        comm.send(std::span<std::int64_t const>(token), next);
      }
      checks.equal(got[0], std::int64_t{prev}, "ring recv");
      // Zero-length messages are fine.
      std::vector<double> none;
      P2POp const empty[] = {P2POp::send(std::span<double const>(none), next),
                             P2POp::recv(std::span<double>(none), prev)};
      comm.exchange(std::span<P2POp const>(empty));
    });
  }
}

TEMPLATE_LIST_TEST_CASE("split groups ranks by colour and orders them by key", "[comm]", Backends) {
  for (int n : {1, 4, 8}) {
    expect_clean<TestType>(n, [](auto& comm, RankChecks& checks) {
      int const me = comm.rank();
      // Colour by parity, key reverses the order.
      auto sub = comm.split(me % 2, -me);
      int const members = (comm.size() + 1 - me % 2) / 2;
      checks.equal(sub.size(), members, "split size");
      checks.equal(sub.rank(), members - 1 - me / 2, "split rank (reverse key order)");
      std::vector<std::int32_t> mine{me}, all(static_cast<std::size_t>(sub.size()));
      sub.all_gather(std::span<std::int32_t const>(mine), std::span<std::int32_t>(all));
      for (int k = 0; k < sub.size(); ++k)
        checks.equal(all[static_cast<std::size_t>(k)], (members - 1 - k) * 2 + me % 2,
                     fmt::format("member {} of the split", k));
      // Ranks left out get a null communicator; the others one of size 1.
      auto lonely = comm.split(me == 0 ? 0 : kUndefinedColor, 0);
      checks.equal(lonely.valid(), me == 0, "undefined colour gives a null communicator");
      if (me == 0) checks.equal(lonely.size(), 1, "single-member split");
      // Splits of splits work and collectives on them do not interfere with the parent.
      auto subsub = sub.split(0, sub.rank());
      std::vector<float> x{1.0f};
      subsub.all_reduce(std::span<float>(x));
      comm.barrier();
      checks.equal(x[0], static_cast<float>(members), "all_reduce on a split of a split");
    });
  }
}

TEMPLATE_LIST_TEST_CASE("bad arguments are rejected before any communication, naming the numbers",
                        "[comm]", Backends) {
  expect_clean<TestType>(2, [](auto& comm, RankChecks& checks) {
    auto message = [](auto&& call) { return moefold::test::error_of(call); };
    std::vector<float> a(3), b(5);
    std::vector<std::int64_t> wrong_len{1, 2, 3};
    auto m1 = message([&] {
      comm.all_gather_v(std::span<float const>(a), std::span<float>(b),
                        std::span<std::int64_t const>(wrong_len));
    });
    checks.check(m1.find("counts has 3 entries but the group has 2 ranks") != std::string::npos, m1);
    auto m2 = message([&] {
      comm.all_gather(std::span<float const>(a), std::span<float>(b));
    });
    checks.check(m2.find("the sum of counts (recv size) is 6 but the buffer holds 5") != std::string::npos, m2);
    auto m3 = message([&] { comm.broadcast(std::span<float>(a), 2); });
    checks.check(m3.find("broadcast root 2 is outside the group of size 2") != std::string::npos, m3);
    std::vector<std::int64_t> negative{-1, 4};
    auto m4 = message([&] {
      comm.all_to_all_v(std::span<float const>(a), std::span<std::int64_t const>(negative),
                        std::span<float>(b), std::span<std::int64_t const>(negative));
    });
    checks.check(m4.find("send_counts[0] = -1 is negative") != std::string::npos, m4);
    comm.barrier();  // the world is still healthy
  });
}
