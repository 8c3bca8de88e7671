// Every collective with every element type on OpenMPI: each DType maps to its own MPI type (bf16
// moves as MPI_UINT16_T and is reduced in float), with uneven and zero counts. Values are small
// integers, so results are exact in any reduction order.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "comm/mpi_harness.hpp"
#include "moefold/comm/mpi/communicator.hpp"
#include "support/catch.hpp"

using namespace moefold;
using moefold::test::MpiHarness;
using moefold::test::RankChecks;
using Comm = mpi::Communicator;

namespace {

constexpr int kRanks = 4;

// A small integer that depends on (rank, index), exact in every type, ≥ 0 so uint8 works.
template <class T>
T value(int rank, std::size_t i) {
  return T(static_cast<float>((rank * 5 + static_cast<int>(i % 1000) * 3) % 23));
}

template <class T>
double as_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}

// Rank p's count in a v-collective: zeros included, uneven.
std::int64_t uneven(int p, int salt) { return (p * 2 + salt) % 5 == 0 ? 0 : (p * 2 + salt) % 5; }

std::vector<std::int64_t> uneven_counts(int n, int salt) {
  std::vector<std::int64_t> c(static_cast<std::size_t>(n));
  for (int p = 0; p < n; ++p) c[static_cast<std::size_t>(p)] = uneven(p, salt);
  return c;
}

std::size_t sum(std::vector<std::int64_t> const& c) {
  return static_cast<std::size_t>(std::accumulate(c.begin(), c.end(), std::int64_t{0}));
}

double reduce(double a, double b, ReduceOp op) {
  return op == ReduceOp::sum ? a + b : op == ReduceOp::max ? std::max(a, b) : std::min(a, b);
}

// Runs `body.template operator()<T>(comm, checks)` for every element type.
template <class Body>
void for_every_dtype(Comm& comm, RankChecks& checks, Body body) {
  body.template operator()<float>(comm, checks);
  body.template operator()<double>(comm, checks);
  body.template operator()<bf16>(comm, checks);
  body.template operator()<std::int32_t>(comm, checks);
  body.template operator()<std::int64_t>(comm, checks);
  body.template operator()<std::uint8_t>(comm, checks);
}

void expect_clean(std::optional<std::vector<std::string>> const& failures) {
  if (!failures) {
    WARN("mpi: " << kRanks << " ranks not available (run with mpiexec -n 4 or more), skipped");
    return;
  }
  INFO(fmt::format("{}", fmt::join(*failures, "\n")));
  CHECK(failures->empty());
}

}  // namespace

TEST_CASE("mpi: all_reduce of every dtype and op, zero and large counts", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
        for (std::size_t count : {0u, 1u, 17u, 3000u}) {
          std::vector<T> x(count);
          for (std::size_t i = 0; i < count; ++i) x[i] = value<T>(c.rank(), i);
          c.all_reduce(std::span<T>(x), op);
          for (std::size_t i = 0; i < count; ++i) {
            double expected = as_double(value<T>(0, i));
            for (int r = 1; r < c.size(); ++r)
              expected = reduce(expected, as_double(value<T>(r, i)), op);
            if (as_double(x[i]) != expected) {
              ch.equal(as_double(x[i]), expected,
                       fmt::format("all_reduce {} {} count {} [{}]", name(dtype_of<T>()), name(op),
                                   count, i));
              break;
            }
          }
        }
      }
    });
  }));
}

TEST_CASE("mpi: bf16 sums accumulate in float and round once", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    // 1 + 3·2⁻⁸ lies halfway between two bf16 values and rounds to even, 1 + 2·2⁻⁷; rounding
    // after every addition would have stayed at 1.
    float const tiny = 1.0f / 256.0f;
    std::vector<bf16> x{bf16(comm.rank() == 0 ? 1.0f : tiny)};
    comm.all_reduce(std::span<bf16>(x));
    float const exact = 1.0f + static_cast<float>(comm.size() - 1) * tiny;
    checks.equal(static_cast<float>(x[0]), static_cast<float>(bf16(exact)), "bf16 all_reduce sum");

    std::vector<bf16> send(static_cast<std::size_t>(comm.size()),
                           bf16(comm.rank() == 0 ? 1.0f : tiny));
    std::vector<bf16> recv(1);
    comm.reduce_scatter(std::span<bf16 const>(send), std::span<bf16>(recv));
    checks.equal(static_cast<float>(recv[0]), static_cast<float>(bf16(exact)),
                 "bf16 reduce_scatter sum");
  }));
}

TEST_CASE("mpi: broadcast of every dtype from every root", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      for (int root = 0; root < c.size(); ++root) {
        for (std::size_t count : {0u, 9u}) {
          std::vector<T> x(count, T(static_cast<float>(99)));
          if (c.rank() == root)
            for (std::size_t i = 0; i < count; ++i) x[i] = value<T>(root, i);
          c.broadcast(std::span<T>(x), root);
          for (std::size_t i = 0; i < count; ++i)
            if (!(x[i] == value<T>(root, i))) {
              ch.equal(as_double(x[i]), as_double(value<T>(root, i)),
                       fmt::format("broadcast {} root {} [{}]", name(dtype_of<T>()), root, i));
              break;
            }
        }
      }
    });
  }));
}

TEST_CASE("mpi: all_gather_v of every dtype with uneven and zero counts", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      for (int salt : {0, 1, 3}) {
        auto const counts = uneven_counts(c.size(), salt);
        std::vector<T> send(static_cast<std::size_t>(counts[static_cast<std::size_t>(c.rank())]));
        for (std::size_t i = 0; i < send.size(); ++i) send[i] = value<T>(c.rank(), i);
        std::vector<T> recv(sum(counts));
        c.all_gather_v(std::span<T const>(send), std::span<T>(recv),
                       std::span<std::int64_t const>(counts));
        std::size_t k = 0;
        for (int r = 0; r < c.size(); ++r)
          for (std::int64_t i = 0; i < counts[static_cast<std::size_t>(r)]; ++i, ++k)
            if (!(recv[k] == value<T>(r, static_cast<std::size_t>(i))))
              ch.check(false, fmt::format("all_gather_v {} salt {}: element {} of rank {} wrong",
                                          name(dtype_of<T>()), salt, i, r));
      }
      // Nobody sends anything.
      std::vector<std::int64_t> const zeros(static_cast<std::size_t>(c.size()), 0);
      std::vector<T> none;
      c.all_gather_v(std::span<T const>(none), std::span<T>(none),
                     std::span<std::int64_t const>(zeros));
    });
  }));
}

TEST_CASE("mpi: reduce_scatter_v of every dtype and op with uneven and zero counts",
          "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
        for (int salt : {0, 2}) {
          auto const counts = uneven_counts(c.size(), salt);
          std::vector<T> send(sum(counts));
          for (std::size_t i = 0; i < send.size(); ++i) send[i] = value<T>(c.rank(), i);
          std::vector<T> recv(static_cast<std::size_t>(counts[static_cast<std::size_t>(c.rank())]));
          c.reduce_scatter_v(std::span<T const>(send), std::span<T>(recv),
                             std::span<std::int64_t const>(counts), op);
          auto const offset = static_cast<std::size_t>(
              std::accumulate(counts.begin(), counts.begin() + c.rank(), std::int64_t{0}));
          for (std::size_t i = 0; i < recv.size(); ++i) {
            double expected = as_double(value<T>(0, offset + i));
            for (int r = 1; r < c.size(); ++r)
              expected = reduce(expected, as_double(value<T>(r, offset + i)), op);
            ch.equal(as_double(recv[i]), expected,
                     fmt::format("reduce_scatter_v {} {} salt {} [{}]", name(dtype_of<T>()),
                                 name(op), salt, i));
          }
        }
      }
    });
  }));
}

TEST_CASE("mpi: all_to_all_v of every dtype with uneven and zero counts", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      int const p = c.size(), me = c.rank();
      // Rank q sends count(q, d) elements to rank d; element k is value(q, d·8 + k).
      auto count = [](int q, int d) { return static_cast<std::int64_t>((q * 3 + d) % 4); };
      std::vector<std::int64_t> send_counts(static_cast<std::size_t>(p)),
          recv_counts(static_cast<std::size_t>(p));
      std::vector<T> send;
      for (int d = 0; d < p; ++d) {
        send_counts[static_cast<std::size_t>(d)] = count(me, d);
        recv_counts[static_cast<std::size_t>(d)] = count(d, me);
        for (std::int64_t k = 0; k < count(me, d); ++k)
          send.push_back(value<T>(me, static_cast<std::size_t>(d * 8 + k)));
      }
      std::vector<T> recv(sum(recv_counts));
      c.all_to_all_v(std::span<T const>(send), std::span<std::int64_t const>(send_counts),
                     std::span<T>(recv), std::span<std::int64_t const>(recv_counts));
      std::size_t i = 0;
      for (int q = 0; q < p; ++q)
        for (std::int64_t k = 0; k < count(q, me); ++k, ++i)
          if (!(recv[i] == value<T>(q, static_cast<std::size_t>(me * 8 + k))))
            ch.check(false, fmt::format("all_to_all_v {}: element {} from rank {} wrong",
                                        name(dtype_of<T>()), k, q));
    });
  }));
}

TEST_CASE("mpi: exchange of every dtype, many messages to one peer in flight", "[mpi][dtype]") {
  expect_clean(MpiHarness::run(kRanks, [](Comm& comm, RankChecks& checks) {
    for_every_dtype(comm, checks, []<class T>(Comm& c, RankChecks& ch) {
      int const p = c.size(), me = c.rank();
      int const next = (me + 1) % p, prev = (me + p - 1) % p;
      // Three tags each way, receives posted before sends, counts 0, 1 and 1000.
      std::vector<std::vector<T>> out, in;
      for (std::size_t n : {0u, 1u, 1000u}) {
        out.emplace_back(n);
        for (std::size_t i = 0; i < n; ++i) out.back()[i] = value<T>(me, i + n);
        in.emplace_back(n);
      }
      std::vector<P2POp> ops;
      for (int t = 0; t < 3; ++t)
        ops.push_back(P2POp::recv(std::span<T>(in[static_cast<std::size_t>(t)]), prev, t));
      for (int t = 2; t >= 0; --t)
        ops.push_back(P2POp::send(std::span<T const>(out[static_cast<std::size_t>(t)]), next, t));
      c.exchange(ops);
      for (std::size_t t = 0; t < 3; ++t)
        for (std::size_t i = 0; i < in[t].size(); ++i)
          if (!(in[t][i] == value<T>(prev, i + in[t].size()))) {
            ch.check(false,
                     fmt::format("exchange {} tag {} [{}] wrong", name(dtype_of<T>()), t, i));
            break;
          }
    });
  }));
}
