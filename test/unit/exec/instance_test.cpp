// Execution instances and their memory: views and buffers, Cpu's primitives against direct
// loops, ShuffledCpu's scrambled order (every index once, a different order per call, an
// order-dependent body caught), the fmt-free message formatter and the ops tier's element-wise
// launchers.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/format.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/grouped_gemm.hpp"
#include "moefold/exec/shuffled_cpu.hpp"
#include "moefold/ops/activations.hpp"
#include "moefold/ops/elementwise.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::error_of;

namespace {
/// A body that records the order it is called in.
struct Record {
  std::vector<std::int64_t>* seen;
  void operator()(std::int64_t i) const { seen->push_back(i); }
};
/// A body that depends on the order it runs in (reads what the previous index wrote): a
/// prefix sum written as an element body. Correct only in ascending order.
struct OrderDependentPrefix {
  std::int64_t* y;
  void operator()(std::int64_t i) const {
    if (i > 0) y[i] += y[i - 1];
  }
};
}  // namespace

TEST_CASE("a View addresses rows, columns and sub-views with its leading dimension",
          "[core][view]") {
  std::vector<int> data(20);
  std::iota(data.begin(), data.end(), 0);
  View<int> v(data.data(), 4, 3, 5);  // 4 rows of 3 inside rows of 5
  CHECK(v.rows() == 4);
  CHECK(v.cols() == 3);
  CHECK(v.size() == 12);
  CHECK_FALSE(v.contiguous());
  CHECK(v(2, 1) == 11);
  CHECK(v.row(3)[2] == 17);
  CHECK(v.rows(1, 2)(1, 0) == 10);
  CHECK(v.cols(1, 2)(0, 1) == 2);
  View<int const> c = v;  // to const
  CHECK(c(3, 0) == 15);
  View<int const> from_vector = data;  // host views from vectors
  CHECK(from_vector.size() == 20);
  CHECK(from_vector.contiguous());
  std::span<int const> s = from_vector;  // and back to spans
  CHECK(s.size() == 20);
}

TEST_CASE("a host Buffer reads like a vector and its views alias its elements", "[core][buffer]") {
  Cpu const exec;
  auto b = exec.allocate<double>(6);
  CHECK(b.size() == 6);
  CHECK(std::all_of(b.begin(), b.end(), [](double x) { return x == 0.0; }));
  auto v = b.view(2, 3);
  v(1, 2) = 5.0;
  CHECK(b[5] == 5.0);
  b.resize(8, 1.0);
  CHECK(b.back() == 1.0);
  std::vector<double> copy = b;
  CHECK(copy.size() == 8);
  std::vector<double> moved = std::move(b);
  CHECK(moved[5] == 5.0);
  CHECK(error_of([&] { (void)exec.allocate<float>(-1); }).find("negative element count -1") !=
        std::string::npos);
}

TEST_CASE("Cpu's copy, scan, histogram and stable sort equal direct loops", "[exec][cpu]") {
  Cpu const exec;
  std::vector<float> src(12), dst(20, -1.f);
  std::iota(src.begin(), src.end(), 1.f);
  copy<float>(exec, View<float const>(src.data(), 3, 4), View<float>(dst.data(), 3, 4, 6));
  CHECK(dst[6 + 3] == 8.f);
  CHECK(dst[4] == -1.f);  // outside the strided destination
  CHECK(error_of([&] {
          copy<float>(exec, View<float const>(src.data(), 3, 4), View<float>(dst.data(), 4, 3));
        }).find("copy: source is 3×4, destination 4×3") != std::string::npos);

  std::vector<std::int64_t> keys{2, 0, 2, -1, 1, 0, 2, 5};
  std::vector<std::int64_t> counts(3);
  histogram<std::int64_t>(exec, keys, counts);
  CHECK(counts == std::vector<std::int64_t>{2, 1, 3});  // -1 and 5 are not counted
  std::vector<std::int64_t> offsets(3);
  exclusive_scan<std::int64_t>(exec, counts, offsets);
  CHECK(offsets == std::vector<std::int64_t>{0, 2, 3});
  std::vector<std::int64_t> order(keys.size(), -7);
  auto const kept = stable_sort_by_key<std::int64_t>(exec, keys, 3, order);
  CHECK(kept == 6);
  order.resize(static_cast<std::size_t>(kept));
  CHECK(order == std::vector<std::int64_t>{1, 5, 4, 0, 2, 6});  // by key, ties by index
}

TEST_CASE("Cpu's view gemm equals a triple loop and checks shapes", "[exec][cpu]") {
  Cpu const exec;
  std::vector<double> a{1, 2, 3, 4, 5, 6};         // 2×3
  std::vector<double> b{1, 0, 2, 1, 0, 1, 3, 1, 1, 0, 2, 2};  // 4×3, used transposed
  std::vector<double> c(8, 1.0);                   // 2×4
  gemm<double>(exec, Trans::no, Trans::yes, 2.0, View<double const>(a.data(), 2, 3),
               View<double const>(b.data(), 4, 3), 0.5, View<double>(c.data(), 2, 4));
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      double acc = 0;
      for (int p = 0; p < 3; ++p) acc += a[static_cast<std::size_t>(i * 3 + p)] * b[static_cast<std::size_t>(j * 3 + p)];
      CHECK(c[static_cast<std::size_t>(i * 4 + j)] == 2.0 * acc + 0.5);
    }
  CHECK(error_of([&] {
          gemm<double>(exec, Trans::no, Trans::no, 1.0, View<double const>(a.data(), 2, 3),
                       View<double const>(b.data(), 4, 3), 0.0, View<double>(c.data(), 2, 4));
        }).find("gemm: op(B) is 4×3, expected 3×4") != std::string::npos);
}

TEST_CASE("ShuffledCpu visits every index once, in a different order on each call",
          "[exec][shuffled]") {
  ShuffledCpu const exec;
  for (std::int64_t n : {1, 2, 7, 64, 1000}) {
    std::vector<std::int64_t> first, second;
    for_each(exec, n, Record{&first});
    for_each_row(exec, n, Record{&second});
    std::set<std::int64_t> const a(first.begin(), first.end()), b(second.begin(), second.end());
    CHECK(static_cast<std::int64_t>(first.size()) == n);
    CHECK(static_cast<std::int64_t>(a.size()) == n);
    CHECK(*a.begin() == 0);
    CHECK(*a.rbegin() == n - 1);
    CHECK(b == a);
    if (n > 2) {
      CHECK(first != second);
      std::vector<std::int64_t> ascending(static_cast<std::size_t>(n));
      std::iota(ascending.begin(), ascending.end(), 0);
      CHECK((first != ascending || second != ascending));
    }
  }
  Cpu const cpu;
  std::vector<std::int64_t> in_order;
  for_each(cpu, 5, Record{&in_order});
  CHECK(in_order == std::vector<std::int64_t>{0, 1, 2, 3, 4});
}

TEST_CASE("an order-dependent body gives Cpu's result only by accident on ShuffledCpu",
          "[exec][shuffled]") {
  auto run = [](auto const& exec) {
    std::vector<std::int64_t> y(50, 1);
    for_each(exec, 50, OrderDependentPrefix{y.data()});
    return y;
  };
  auto const want = run(Cpu{});
  CHECK(want.back() == 50);
  int differs = 0;
  for (int call = 0; call < 4; ++call) differs += run(ShuffledCpu{}) != want ? 1 : 0;
  CHECK(differs >= 3);  // a correct (order-free) body would never differ
}

TEST_CASE("element-wise and activation launchers equal their formulas on every instance",
          "[ops]") {
  auto check = [](auto const& exec) {
    std::vector<float> x{1, -2, 3, 0.5f}, y{10, 20, 30, 40};
    ops::axpy(exec, 2.f, View<float const>(x), View<float>(y));
    CHECK(y == std::vector<float>{12, 16, 36, 41});
    ops::add_into(exec, View<float const>(x), View<float>(y));
    CHECK(y == std::vector<float>{13, 14, 39, 41.5f});
    ops::scale(exec, 0.5f, View<float>(y));
    CHECK(y == std::vector<float>{6.5f, 7, 19.5f, 20.75f});
    ops::fill(exec, View<float>(y), 3.f);
    CHECK(y == std::vector<float>{3, 3, 3, 3});
    CHECK(error_of([&] { ops::add_into(exec, View<float const>(x.data(), 3), View<float>(y)); })
              .find("ops::add_into: operands of 3 and 4 elements") != std::string::npos);
    // SwiGLU on two rows [gate | up] of f = 2, against the closed form.
    std::vector<double> h{0.5, -1.0, 2.0, 3.0, 1.5, 0.0, -0.5, 4.0}, out(4), dh(8);
    ops::activation_forward<SwiGLU>(exec, View<double const>(h.data(), 2, 4),
                                    View<double>(out.data(), 2, 2));
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < 2; ++j) {
        double const g = h[static_cast<std::size_t>(r * 4 + j)], u = h[static_cast<std::size_t>(r * 4 + 2 + j)];
        CHECK(out[static_cast<std::size_t>(r * 2 + j)] == Approx(g / (1 + std::exp(-g)) * u).epsilon(1e-14));
      }
    std::vector<double> ones(4, 1.0);
    ops::activation_backward<SwiGLU>(exec, View<double const>(h.data(), 2, 4),
                                     View<double const>(ones.data(), 2, 2),
                                     View<double>(dh.data(), 2, 4));
    // d/du = silu(g); d/dg = u·σ(g)(1 + g(1 − σ(g)))
    double const g = 1.5, u = -0.5, s = 1 / (1 + std::exp(-g));  // row 1, column 0
    CHECK(dh[4] == Approx(u * s * (1 + g * (1 - s))).epsilon(1e-14));
    CHECK(dh[6] == Approx(g * s).epsilon(1e-14));
  };
  check(Cpu{});
  check(ShuffledCpu{});
}

TEST_CASE("grouped_gemm sizes the workspace through the instance and names the policy's reason",
          "[exec][grouped_gemm]") {
  Cpu const exec;
  Buffer<std::byte> workspace;
  std::vector<float> a{1, 2}, b{3, 4}, c(1);
  std::vector<GemmProblem<float>> ps{{.m = 1, .n = 1, .k = 2, .a = a.data(), .lda = 2,
                                      .b = b.data(), .ldb = 1, .c = c.data(), .ldc = 1}};
  grouped_gemm<BlasGroupedGemm>(exec, std::span<GemmProblem<float> const>(ps), workspace);
  CHECK(c[0] == 11.f);
  ps[0].k = -1;
  CHECK(error_of([&] {
          grouped_gemm<BlasGroupedGemm>(exec, std::span<GemmProblem<float> const>(ps), workspace);
        }).find("grouped GEMM (blas): problem 0 has a negative size (1×1×-1)") != std::string::npos);
}

TEST_CASE("MOEFOLD_EXPECTS formats {} placeholders without fmt", "[core][format]") {
  CHECK(detail::format_message("a {} b {} c {}", 3, std::string("x"), 2.5) == "a 3 b x c 2.5");
  CHECK(detail::format_message("{{literal}} {}", true) == "{literal} true");
  CHECK(detail::format_message("no args") == "no args");
  CHECK(detail::format_message("{} {}", -7L, 'q') == "-7 q");
  auto const msg = error_of([] { MOEFOLD_EXPECTS(1 + 1 == 3, "sum {} is not {}", 2, 3); });
  CHECK(msg.find("sum 2 is not 3 (precondition `1 + 1 == 3` failed at") != std::string::npos);
}
