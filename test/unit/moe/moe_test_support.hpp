#pragma once
// Shared pieces of the MoE tests: deterministic tokens and routings that every rank can
// recompute for any rank (so metadata can be checked by direct count), the per-expert test
// functions f_e(x) = (e+1)·x + e, and tensor comparison with DESIGN.md §3's tolerance.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/init.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/routing.hpp"

namespace moefold::test {

/// Relative L2 distance ‖a − b‖ / ‖b‖ (absolute when b = 0); a size mismatch gives +inf.
template <class Real>
double rel_error(std::span<Real const> a, std::span<Real const> b) {
  if (a.size() != b.size()) return INFINITY;
  double d = 0, n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const x = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    d += x * x;
    n += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return n > 0 ? std::sqrt(d / n) : std::sqrt(d);
}
template <class Real>
double rel_error(std::vector<Real> const& a, std::vector<Real> const& b) {
  return rel_error<Real>(std::span<Real const>(a), std::span<Real const>(b));
}

/// `[rows, cols]` values of a named tensor of world rank `rank`, uniform in [lo, lo + width).
template <class Real>
std::vector<Real> tensor(std::string const& name, int rank, std::int64_t rows, std::int64_t cols,
                         double lo = -1.0, double width = 2.0) {
  std::vector<Real> v(static_cast<std::size_t>(rows * cols));
  auto const n = fmt::format("{}.{}", name, rank);
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] =
        static_cast<Real>(lo + width * (0.5 + 0.5 * init_value(7, n, i, InitDist::uniform, 1.0)));
  return v;
}

/// How a test routing picks experts.
enum class Skew { uniform, first_ranks };

/// A routing of `tokens` tokens of world rank `rank` over E experts, top-K, with unnormalized
/// probabilities in [0.1, 1.1). `first_ranks` sends every token to the lowest experts only
/// (the first max(K, E/4) experts), which leaves later EP ranks with no tokens.
template <class Real>
Routing<Real> test_routing(int rank, std::int64_t tokens, int experts, int k, Skew skew) {
  int const pool = skew == Skew::uniform ? experts : std::max(k, experts / 4);
  std::vector<int> ids;
  std::vector<Real> probs;
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<int> chosen;
    std::uint64_t salt = 0;
    while (static_cast<int>(chosen.size()) < k) {
      double const u = 0.5 + 0.5 * init_value(11, fmt::format("route.{}", rank),
                                              static_cast<std::uint64_t>(t) * 64 + salt++,
                                              InitDist::uniform, 1.0);
      int const e = std::min(pool - 1, static_cast<int>(u * pool));
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (int e : chosen) {
      ids.push_back(e);
      probs.push_back(
          static_cast<Real>(0.6 + 0.5 * init_value(13, fmt::format("prob.{}", rank),
                                                   static_cast<std::uint64_t>(t * experts + e),
                                                   InitDist::uniform, 1.0)));
    }
  }
  return Routing<Real>::from_top_k(tokens, experts, k, ids, probs);
}

/// The test expert e: f_e(x) = (e+1)·x + e, element-wise.
template <class Real>
Real expert_fn(int e, Real x) {
  return static_cast<Real>(e + 1) * x + static_cast<Real>(e);
}

/// The serial MoE output of one rank's tokens: Σ over kept entries p · f_e(x), and its
/// gradients for the loss Σ ⟨g, y⟩: d_x = Σ p·(e+1)·g and d_p[t,e] = ⟨g, f_e(x)⟩.
template <class Real>
struct SerialMoe {
  std::vector<Real> y, dx, dp;
};
template <class Real>
SerialMoe<Real> serial_moe(Routing<Real> const& r, std::vector<Real> const& x,
                           std::vector<Real> const& g, std::int64_t h) {
  SerialMoe<Real> s;
  auto const T = r.num_tokens, E = r.num_experts;
  s.y.assign(static_cast<std::size_t>(T * h), Real(0));
  s.dx.assign(s.y.size(), Real(0));
  s.dp.assign(static_cast<std::size_t>(T * E), Real(0));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) {
      auto const at = static_cast<std::size_t>(t * E + e);
      if (r.map[at] != Route::routed) continue;
      Real const p = r.probs[at];
      double dot = 0;
      for (std::int64_t c = 0; c < h; ++c) {
        auto const i = static_cast<std::size_t>(t * h + c);
        Real const f = expert_fn<Real>(static_cast<int>(e), x[i]);
        s.y[i] += p * f;
        s.dx[i] += p * static_cast<Real>(e + 1) * g[i];
        dot += static_cast<double>(g[i]) * static_cast<double>(f);
      }
      s.dp[at] = static_cast<Real>(dot);
    }
  return s;
}

}  // namespace moefold::test
