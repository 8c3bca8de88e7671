// The tiled, online-softmax causal attention (ops/flash_attention.hpp) against a naive causal
// GQA attention that keeps the full probabilities: outputs, row logsumexp and the three input
// gradients, at shapes whose lengths are not multiples of the tile, with GQA, and with the key
// order of two CP chunks per rank; the gradients also against central finite differences; the
// results bitwise the same on `Cpu` and the test instance (scrambled body order under
// ShuffledCpu); and the errors for shapes it cannot take.

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moefold/exec/cpu.hpp"
#include "moefold/ops/flash_attention.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"
#include "unit/nn/nn_support.hpp"

using namespace moefold;
using namespace moefold::test;

namespace {

template <class T>
struct Problem {
  ops::FlashShape sh;
  std::vector<T> q, k, v, dout;
  std::vector<std::int64_t> qpos, kpos;
  T scale() const { return static_cast<T>(1.0 / std::sqrt(double(sh.dim))); }
};

/// Positions: contiguous (cp = 1), or CP rank `rank` of `cp` (chunks rank and 2·cp−1−rank as
/// queries; the keys of every rank gathered in rank order).
template <class T>
Problem<T> problem(ops::FlashShape sh, int cp = 1, int rank = 0) {
  Problem<T> p;
  p.sh = sh;
  auto const n = [](std::int64_t x) { return static_cast<std::size_t>(x); };
  p.q = random_tensor<T>(n(sh.sq * sh.ldq()), "q", 2.0);
  p.k = random_tensor<T>(n(sh.sk * sh.ldk()), "k", 2.0);
  p.v = random_tensor<T>(n(sh.sk * sh.ldk()), "v");
  p.dout = random_tensor<T>(p.q.size(), "dout");
  std::int64_t const chunk = sh.sk / (2 * cp);
  auto const positions = [&](int c) {
    std::vector<std::int64_t> out;
    if (cp == 1) {
      for (std::int64_t i = 0; i < sh.sk; ++i) out.push_back(i);
      return out;
    }
    for (std::int64_t i = 0; i < chunk; ++i) out.push_back(c * chunk + i);
    for (std::int64_t i = 0; i < chunk; ++i) out.push_back((2 * cp - 1 - c) * chunk + i);
    return out;
  };
  p.qpos = positions(rank);
  for (int c = 0; c < cp; ++c) {
    auto const k = positions(c);
    p.kpos.insert(p.kpos.end(), k.begin(), k.end());
  }
  return p;
}

struct Result {
  std::vector<double> o, lse, dq, dk, dv;
};

/// The naive reference: full probability rows, D = Σ_j P·dP (not rowsum(dO ∘ O)).
template <class T>
Result naive(Problem<T> const& p) {
  auto const& sh = p.sh;
  std::int64_t const d = sh.dim, per = sh.heads / sh.groups;
  double const scale = 1.0 / std::sqrt(double(d));
  Result r;
  r.o.assign(p.q.size(), 0.0);
  r.dq.assign(p.q.size(), 0.0);
  r.dk.assign(p.k.size(), 0.0);
  r.dv.assign(p.k.size(), 0.0);
  r.lse.assign(static_cast<std::size_t>(sh.batch * sh.heads * sh.sq), 0.0);
  auto qi = [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t c) {
    return static_cast<std::size_t>((i * sh.batch + b) * sh.heads * d + h * d + c);
  };
  auto ki = [&](std::int64_t b, std::int64_t g, std::int64_t j, std::int64_t c) {
    return static_cast<std::size_t>((j * sh.batch + b) * sh.groups * d + g * d + c);
  };
  for (std::int64_t b = 0; b < sh.batch; ++b)
    for (std::int64_t h = 0; h < sh.heads; ++h)
      for (std::int64_t i = 0; i < sh.sq; ++i) {
        std::int64_t const g = h / per;
        std::vector<double> s(static_cast<std::size_t>(sh.sk), 0.0);
        double mx = -INFINITY;
        for (std::int64_t j = 0; j < sh.sk; ++j) {
          if (p.kpos[std::size_t(j)] > p.qpos[std::size_t(i)]) continue;
          double dot = 0;
          for (std::int64_t c = 0; c < d; ++c)
            dot += double(p.q[qi(b, h, i, c)]) * p.k[ki(b, g, j, c)];
          s[std::size_t(j)] = dot * scale;
          mx = std::max(mx, s[std::size_t(j)]);
        }
        double z = 0;
        for (std::int64_t j = 0; j < sh.sk; ++j)
          z += p.kpos[std::size_t(j)] > p.qpos[std::size_t(i)] ? 0.0
                                                               : std::exp(s[std::size_t(j)] - mx);
        r.lse[std::size_t((b * sh.heads + h) * sh.sq + i)] = mx + std::log(z);
        std::vector<double> prob(s.size(), 0.0), dp(s.size(), 0.0);
        double dsum = 0;
        for (std::int64_t j = 0; j < sh.sk; ++j) {
          if (p.kpos[std::size_t(j)] > p.qpos[std::size_t(i)]) continue;
          prob[std::size_t(j)] = std::exp(s[std::size_t(j)] - mx) / z;
          for (std::int64_t c = 0; c < d; ++c) {
            r.o[qi(b, h, i, c)] += prob[std::size_t(j)] * p.v[ki(b, g, j, c)];
            dp[std::size_t(j)] += double(p.dout[qi(b, h, i, c)]) * p.v[ki(b, g, j, c)];
          }
          dsum += prob[std::size_t(j)] * dp[std::size_t(j)];
        }
        for (std::int64_t j = 0; j < sh.sk; ++j) {
          double const ds = prob[std::size_t(j)] * (dp[std::size_t(j)] - dsum) * scale;
          for (std::int64_t c = 0; c < d; ++c) {
            r.dq[qi(b, h, i, c)] += ds * p.k[ki(b, g, j, c)];
            r.dk[ki(b, g, j, c)] += ds * p.q[qi(b, h, i, c)];
            r.dv[ki(b, g, j, c)] += prob[std::size_t(j)] * p.dout[qi(b, h, i, c)];
          }
        }
      }
  return r;
}

/// o, lse, dq, dk, dv of the tiled core with the given tile kernel.
template <class T, class E>
std::vector<std::vector<T>> flash(E const& exec, Problem<T> const& p,
                                  ops::TileKernel kernel = ops::best_tile_kernel()) {
  auto const& sh = p.sh;
  std::vector<T> o(p.q.size()), lse(std::size_t(sh.batch * sh.heads * sh.sq)), delta(lse.size());
  std::vector<T> dq(p.q.size()), dk(p.k.size()), dv(p.k.size());
  // Fresh outputs full of NaN: every body must write all it owns.
  for (auto* x : {&o, &lse, &delta, &dq, &dk, &dv}) std::fill(x->begin(), x->end(), T(NAN));
  ops::flash_attention_forward(exec, sh, p.scale(), p.q, p.k, p.v, p.qpos, p.kpos, View<T>(o),
                               View<T>(lse), kernel);
  ops::flash_attention_backward(exec, sh, p.scale(), p.q, p.k, p.v, o, lse, p.dout, p.qpos, p.kpos,
                                View<T>(delta), View<T>(dq), View<T>(dk), View<T>(dv), kernel);
  return {o, lse, dq, dk, dv};
}

/// The tile kernels this build and processor run (portable first).
std::vector<ops::TileKernel> kernels() {
  std::vector<ops::TileKernel> out;
  for (auto k : {ops::TileKernel::portable, ops::TileKernel::avx2, ops::TileKernel::avx512})
    if (ops::tile_kernel_available(k)) out.push_back(k);
  return out;
}

double rel(std::vector<double> const& a, std::vector<double> const& b) {
  return relative_error(a, b);
}
template <class T>
std::vector<double> wide(std::vector<T> const& x) {
  return {x.begin(), x.end()};
}

struct Case {
  std::string name;
  ops::FlashShape sh;
  int cp = 1, rank = 0;
};

std::vector<Case> cases() {
  return {
      {"GQA 4 heads / 2 groups, S 150 (2 tiles + 22), B 2, d 8",
       {.batch = 2, .heads = 4, .groups = 2, .sq = 150, .sk = 150, .dim = 8}},
      {"MHA 2 heads, S 65 (1 tile + 1), d 64",
       {.batch = 1, .heads = 2, .groups = 2, .sq = 65, .sk = 65, .dim = 64}},
      {"one partial tile, S 5, 3 heads / 1 group, d 6",
       {.batch = 3, .heads = 3, .groups = 1, .sq = 5, .sk = 5, .dim = 6}},
      {"CP 2, rank 0 (chunks 0 and 3 of 4 × 50), GQA 2 / 1, B 2, d 16",
       {.batch = 2, .heads = 2, .groups = 1, .sq = 100, .sk = 200, .dim = 16},
       2,
       0},
      {"CP 2, rank 1 (chunks 1 and 2 of 4 × 50), GQA 2 / 1, B 2, d 16",
       {.batch = 2, .heads = 2, .groups = 1, .sq = 100, .sk = 200, .dim = 16},
       2,
       1},
  };
}

}  // namespace

TEST_CASE("tiled online-softmax attention equals the naive causal GQA attention, gradients too",
          "[nn][attention][flash]") {
  for (auto const kernel : kernels())
    for (auto const& c : cases()) {
      INFO(c.name << ", tile kernel " << ops::to_string(kernel));
      auto const p = problem<double>(c.sh, c.cp, c.rank);
      auto const ref = naive(p);
      auto const got = flash(Exec{}, p, kernel);
      CHECK(rel(got[0], ref.o) < 1e-13);
      CHECK(rel(got[1], ref.lse) < 1e-13);
      CHECK(rel(got[2], ref.dq) < 1e-12);
      CHECK(rel(got[3], ref.dk) < 1e-12);
      CHECK(rel(got[4], ref.dv) < 1e-12);
      // fp32 against the fp64 reference (DESIGN §3: 1e-5).
      auto pf = problem<float>(c.sh, c.cp, c.rank);
      auto const gf = flash(Exec{}, pf, kernel);
      auto const reff = naive(pf);
      CHECK(rel(wide(gf[0]), reff.o) < 1e-5);
      CHECK(rel(wide(gf[2]), reff.dq) < 1e-5);
      CHECK(rel(wide(gf[3]), reff.dk) < 1e-5);
      CHECK(rel(wide(gf[4]), reff.dv) < 1e-5);
    }
}

TEST_CASE("tiled attention's gradients equal central finite differences of Σ dout ∘ o",
          "[nn][attention][flash]") {
  // S 72 (a tile and 8), GQA; CP rank 1 of 2 so that the key order is not the query order.
  for (int cp : {1, 2}) {
    INFO("CP " << cp);
    auto p = problem<double>(
        {.batch = 1, .heads = 2, .groups = 1, .sq = 72 / cp, .sk = 72, .dim = 4}, cp, cp - 1);
    auto const got = flash(Cpu{}, p);
    auto loss = [&] {
      auto const r = flash(Cpu{}, p);
      double l = 0;
      for (std::size_t i = 0; i < r[0].size(); ++i) l += r[0][i] * p.dout[i];
      return l;
    };
    std::vector<double> fq, fk, fv;
    for (auto& x : p.q) fq.push_back(central_difference(x, loss));
    for (auto& x : p.k) fk.push_back(central_difference(x, loss));
    for (auto& x : p.v) fv.push_back(central_difference(x, loss));
    CHECK(rel(got[2], fq) < 1e-6);
    CHECK(rel(got[3], fk) < 1e-6);
    CHECK(rel(got[4], fv) < 1e-6);
  }
}

TEST_CASE("tiled attention is bitwise the same in any body order", "[nn][attention][flash]") {
  // Under MOEFOLD_TEST_EXECUTION=ShuffledCpu, Exec runs the bodies in a scrambled order.
  for (auto const& c : cases()) {
    INFO(c.name);
    auto const p = problem<float>(c.sh, c.cp, c.rank);
    auto const a = flash(Cpu{}, p), b = flash(Exec{}, p), e = flash(Exec{}, p);
    for (std::size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i] == b[i]);
      CHECK(b[i] == e[i]);
    }
  }
}

TEST_CASE("tiled attention names the rule and the numbers of a shape it cannot take",
          "[nn][attention][flash][errors]") {
  auto p = problem<float>({.batch = 1, .heads = 2, .groups = 1, .sq = 4, .sk = 4, .dim = 4});
  std::vector<float> o(p.q.size()), lse(8);
  auto const dim = error_of([&] {
    auto sh = p.sh;
    sh.dim = 512;
    ops::flash_attention_forward(Cpu{}, sh, 1.f, p.q, p.k, p.v, p.qpos, p.kpos, View<float>(o),
                                 View<float>(lse));
  });
  CHECK(dim.find("head dimension 512 exceeds the largest supported, 256") != std::string::npos);
  auto const groups = error_of([&] {
    auto sh = p.sh;
    sh.heads = 3;  // groups 2
    sh.groups = 2;
    ops::flash_attention_forward(Cpu{}, sh, 1.f, p.q, p.k, p.v, p.qpos, p.kpos, View<float>(o),
                                 View<float>(lse));
  });
  CHECK(groups.find("heads divisible by groups") != std::string::npos);
  auto const sizes = error_of([&] {
    std::vector<float> small(3);
    ops::flash_attention_forward(Cpu{}, p.sh, 1.f, p.q, p.k, p.v, p.qpos, p.kpos, View<float>(o),
                                 View<float>(small));
  });
  CHECK(sizes.find("lse 3 (expected 8)") != std::string::npos);
}

TEST_CASE("every tile kernel computes the product of a naive loop, edges and strides included",
          "[nn][attention][flash]") {
  // Rows not a multiple of the register block, columns not a multiple of the vectors, a
  // transposed left operand (ar 1, ak 64) as the attention bodies pass it.
  for (auto const kernel : kernels())
    for (auto const [M, N, K, ar, ak] : std::vector<std::array<std::int64_t, 5>>{
             {64, 64, 64, 64, 1}, {13, 37, 5, 1, 64}, {1, 3, 64, 64, 1}, {9, 17, 3, 1, 64}})
      for (bool add : {false, true}) {
        INFO(ops::to_string(kernel) << " M " << M << " N " << N << " K " << K << " add " << add);
        std::int64_t const ld = 72;  // past N: the columns beyond N must stay untouched
        auto const a = random_tensor<double>(64 * 64 + 64, "a");
        auto const b = random_tensor<double>(static_cast<std::size_t>(K * ld), "b");
        auto c = random_tensor<double>(static_cast<std::size_t>(M * ld), "c");
        auto ref = c;
        for (std::int64_t r = 0; r < M; ++r)
          for (std::int64_t j = 0; j < N; ++j) {
            double acc = add ? ref[std::size_t(r * ld + j)] : 0.0;
            for (std::int64_t k = 0; k < K; ++k)
              acc += a[std::size_t(r * ar + k * ak)] * b[std::size_t(k * ld + j)];
            ref[std::size_t(r * ld + j)] = acc;
          }
        ops::tile_product(kernel, add, c.data(), ld, a.data(), ar, ak, b.data(), ld, M, N, K);
        CHECK(rel(c, ref) < 1e-14);
        for (std::int64_t r = 0; r < M; ++r)
          for (std::int64_t j = N; j < ld; ++j)
            CHECK(c[std::size_t(r * ld + j)] == ref[std::size_t(r * ld + j)]);
      }
}

TEST_CASE("the fast tile kernels give the portable kernel's attention within fp32 rounding",
          "[nn][attention][flash]") {
  for (auto const& c : cases()) {
    auto const p = problem<float>(c.sh, c.cp, c.rank);
    auto const portable = flash(Cpu{}, p, ops::TileKernel::portable);
    for (auto const kernel : kernels()) {
      INFO(c.name << ", tile kernel " << ops::to_string(kernel));
      auto const fast = flash(Cpu{}, p, kernel);
      for (std::size_t i = 0; i < fast.size(); ++i)
        CHECK(rel(wide(fast[i]), wide(portable[i])) < 1e-6);
    }
  }
}
