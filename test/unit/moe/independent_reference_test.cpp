// Independent references, in the spirit of llm.c's test_gpt2.c: plain loops written from the
// spec, not from the library's code and without calling the library's helpers for the thing
// under test.
//
//  * The routed experts (spec §2.7): Megatron's fc1 shard [2·F/ETP, H] is [gate; up], the output
//    is fc2 · (p · silu(gate) · up) summed over the ETP shards; GeLU is the exact erf form of
//    torch's default F.gelu. Forward, input, probability and weight gradients (derived by hand).
//  * Capacity and token dropping (spec §2.2 step 5): per expert column, keep the C best tokens
//    (by probability or by position), C = ceil(T·K/E · cf), padding with the lowest unrouted
//    tokens when asked; compared exactly with apply_capacity over random routings.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moefold/moe/capacity.hpp"
#include "moefold/moe/grouped_gemm_experts.hpp"
#include "moefold/moe/routing.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"
#include "support/error_of.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Catch::Matchers::Contains;

namespace {

// ------------------------------------------------------------------------------------------------
// Experts
// ------------------------------------------------------------------------------------------------

constexpr std::int64_t kH = 5, kF = 6;  // F divisible by ETP = 2
constexpr int kLocal = 3, kFirst = 3;   // local experts 3, 4, 5 (EP rank 1 of E = 6, EP = 2)
std::string const kPrefix = "decoder.layers.1.mlp.experts";

ExpertsConfig experts_config(int etp_size, int etp_rank) {
  return {.num_local_experts = kLocal,
          .first_expert = kFirst,
          .hidden_size = kH,
          .ffn_hidden_size = kF,
          .etp_size = etp_size,
          .etp_rank = etp_rank,
          .name_prefix = kPrefix,
          .init_std = 0.5};
}

std::vector<double> uniform(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// `v` rounded to T and back, so the reference sees exactly what the experts see.
template <class T>
std::vector<double> rounded(std::vector<double> const& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(static_cast<T>(v[i]));
  return out;
}

template <class T>
std::vector<T> as(std::vector<double> const& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class Range>
std::vector<double> to_double(Range const& v) {
  return std::vector<double>(v.begin(), v.end());
}

std::string fc1_name(int e) { return kPrefix + ".linear_fc1.weight" + std::to_string(e); }
std::string fc2_name(int e) { return kPrefix + ".linear_fc2.weight" + std::to_string(e); }

/// The parameter called `name` in `experts.parameters()`.
template <class Experts>
Param<typename Experts::value_type>& param_named(Experts& experts, std::string const& name) {
  Param<typename Experts::value_type>* found = nullptr;
  for (auto* p : experts.parameters())
    if (p->name == name) found = p;
  INFO("parameter " << name);
  REQUIRE(found != nullptr);
  return *found;
}

/// One expert's weights on one ETP shard, as Megatron lays them out: `w1` is fc1 [G·fr, H]
/// (for SwiGLU the gate rows [0, fr), then the up rows [fr, 2·fr)), `w2` is fc2 [H, fr].
struct ExpertWeights {
  std::vector<double> w1, w2;
};

template <class Experts>
std::vector<ExpertWeights> weights_of(Experts& experts) {
  std::vector<ExpertWeights> w;
  for (int l = 0; l < kLocal; ++l)
    w.push_back({to_double(param_named(experts, fc1_name(kFirst + l)).value),
                 to_double(param_named(experts, fc2_name(kFirst + l)).value)});
  return w;
}

template <class Experts>
std::vector<ExpertWeights> weight_grads_of(Experts& experts) {
  std::vector<ExpertWeights> w;
  for (int l = 0; l < kLocal; ++l)
    w.push_back({to_double(param_named(experts, fc1_name(kFirst + l)).grad),
                 to_double(param_named(experts, fc2_name(kFirst + l)).grad)});
  return w;
}

// The activations, written out. silu(g) = g·σ(g); silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
// gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2)); gelu'(x) = Φ(x) + x·φ(x).
double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
double silu(double g) { return g / (1.0 + std::exp(-g)); }
double silu_grad(double g) { return sigmoid(g) * (1.0 + g * (1.0 - sigmoid(g))); }
double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_erf_grad(double x) {
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) +
         x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * std::numbers::pi);
}
/// The tanh approximation (F.gelu(approximate="tanh")), only to show the tests tell them apart.
double gelu_tanh(double x) {
  double const c = std::sqrt(2.0 / std::numbers::pi);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}

/// What the reference computes: the real forms, and wrong ones the tests must tell apart.
enum class Form { swiglu, swiglu_gate_up_swapped, gelu, gelu_tanh };

bool gated(Form f) { return f == Form::swiglu || f == Form::swiglu_gate_up_swapped; }

/// Rows and weights of one reference call: rows are grouped by local expert, `counts[l]` each.
struct RefInput {
  std::vector<ExpertWeights> w;  ///< per local expert
  std::int64_t fr = 0;           ///< F / ETP
  std::vector<double> x, p;      ///< [N, H], [N]
  std::vector<std::int64_t> counts;
};

/// y [N, H]: per row of expert l, y = W2 · (p · act(W1 · x)), with plain loops.
std::vector<double> reference_forward(RefInput const& in, Form form) {
  std::int64_t const fr = in.fr;
  std::vector<double> y(in.x.size(), 0.0);
  std::int64_t row = 0;
  for (int l = 0; l < kLocal; ++l) {
    auto const& w1 = in.w[static_cast<std::size_t>(l)].w1;
    auto const& w2 = in.w[static_cast<std::size_t>(l)].w2;
    for (std::int64_t n = 0; n < in.counts[static_cast<std::size_t>(l)]; ++n, ++row) {
      double const* x = in.x.data() + row * kH;
      double const p = in.p[static_cast<std::size_t>(row)];
      for (std::int64_t j = 0; j < fr; ++j) {
        double first = 0, second = 0;  // rows j and fr + j of fc1 times x
        for (std::int64_t c = 0; c < kH; ++c) {
          first += w1[static_cast<std::size_t>(j * kH + c)] * x[c];
          if (gated(form)) second += w1[static_cast<std::size_t>((fr + j) * kH + c)] * x[c];
        }
        double a = 0;
        switch (form) {
          case Form::swiglu:
            a = silu(first) * second;
            break;
          case Form::swiglu_gate_up_swapped:
            a = silu(second) * first;
            break;
          case Form::gelu:
            a = gelu_erf(first);
            break;
          case Form::gelu_tanh:
            a = gelu_tanh(first);
            break;
        }
        for (std::int64_t o = 0; o < kH; ++o)
          y[static_cast<std::size_t>(row * kH + o)] +=
              w2[static_cast<std::size_t>(o * fr + j)] * p * a;
      }
    }
  }
  return y;
}

struct RefGrads {
  std::vector<double> dx, dp;
  std::vector<ExpertWeights> dw;
};

/// Gradients of Σ y ⊙ dy, derived by hand:
///   s_j = p·a_j;  dW2[o,j] += dy_o·s_j;  ds_j = Σ_o dy_o·W2[o,j];  dp = Σ_j ds_j·a_j;  da_j =
///   p·ds_j SwiGLU (a = silu(g)·u):  dg = da·u·silu'(g),  du = da·silu(g) GeLU   (a = gelu(h)): dh
///   = da·gelu'(h) dW1[row, c] += d(row)·x_c;  dx_c = Σ_rows d(row)·W1[row, c]
RefGrads reference_backward(RefInput const& in, Form form, std::vector<double> const& dy) {
  std::int64_t const fr = in.fr;
  bool const glu = form == Form::swiglu;
  REQUIRE((form == Form::swiglu || form == Form::gelu));
  RefGrads g{std::vector<double>(in.x.size(), 0.0), std::vector<double>(in.p.size(), 0.0), {}};
  for (auto const& w : in.w)
    g.dw.push_back({std::vector<double>(w.w1.size(), 0.0), std::vector<double>(w.w2.size(), 0.0)});
  std::int64_t row = 0;
  for (int l = 0; l < kLocal; ++l) {
    auto const& w1 = in.w[static_cast<std::size_t>(l)].w1;
    auto const& w2 = in.w[static_cast<std::size_t>(l)].w2;
    auto& dw1 = g.dw[static_cast<std::size_t>(l)].w1;
    auto& dw2 = g.dw[static_cast<std::size_t>(l)].w2;
    for (std::int64_t n = 0; n < in.counts[static_cast<std::size_t>(l)]; ++n, ++row) {
      double const* x = in.x.data() + row * kH;
      double const* d = dy.data() + row * kH;
      double const p = in.p[static_cast<std::size_t>(row)];
      double* dx = g.dx.data() + row * kH;
      for (std::int64_t j = 0; j < fr; ++j) {
        double first = 0, second = 0;
        for (std::int64_t c = 0; c < kH; ++c) {
          first += w1[static_cast<std::size_t>(j * kH + c)] * x[c];
          if (glu) second += w1[static_cast<std::size_t>((fr + j) * kH + c)] * x[c];
        }
        double const a = glu ? silu(first) * second : gelu_erf(first);
        double ds = 0;
        for (std::int64_t o = 0; o < kH; ++o) {
          ds += d[o] * w2[static_cast<std::size_t>(o * fr + j)];
          dw2[static_cast<std::size_t>(o * fr + j)] += d[o] * p * a;
        }
        g.dp[static_cast<std::size_t>(row)] += ds * a;
        double const da = p * ds;
        double const d_first = glu ? da * second * silu_grad(first) : da * gelu_erf_grad(first);
        double const d_second = glu ? da * silu(first) : 0.0;
        for (std::int64_t c = 0; c < kH; ++c) {
          dw1[static_cast<std::size_t>(j * kH + c)] += d_first * x[c];
          dx[c] += d_first * w1[static_cast<std::size_t>(j * kH + c)];
          if (glu) {
            dw1[static_cast<std::size_t>((fr + j) * kH + c)] += d_second * x[c];
            dx[c] += d_second * w1[static_cast<std::size_t>((fr + j) * kH + c)];
          }
        }
      }
    }
  }
  return g;
}

void add_to(std::vector<double>& sum, std::vector<double> const& v) {
  if (sum.empty()) sum.assign(v.size(), 0.0);
  for (std::size_t i = 0; i < v.size(); ++i) sum[i] += v[i];
}

double rel_err(std::vector<double> const& a, std::vector<double> const& b) {
  return test::relative_error(a, b);
}

template <class Act>
constexpr Form form_of() {
  return std::is_same_v<Act, SwiGLU> ? Form::swiglu : Form::gelu;
}

/// Runs the ETP shards of the experts (each its own object with its own etp_rank) on the same
/// rows, checks each shard's weight gradients against the reference on that shard's weights,
/// and the sums over shards of the outputs, input and probability gradients against the sums of
/// the per-shard references. Returns the summed library output in double.
template <class Act, class T>
std::vector<double> check_shards_against_reference(int etp, double tol) {
  std::vector<std::int64_t> const counts{2, 0, 3};  // the middle expert receives no token
  std::int64_t const rows = 5;
  auto const x = rounded<T>(uniform(static_cast<std::size_t>(rows * kH), 101));
  auto const p = rounded<T>(uniform(static_cast<std::size_t>(rows), 102, 0.1, 1.0));
  auto const dy = rounded<T>(uniform(static_cast<std::size_t>(rows * kH), 103));
  std::vector<double> y_sum, dx_sum, dp_sum, ref_y, ref_dx, ref_dp;
  for (int r = 0; r < etp; ++r) {
    INFO("ETP " << etp << ", shard " << r);
    GroupedGemmExperts<test::Exec, Act, BlasGroupedGemm, T> experts(experts_config(etp, r), 7);
    auto const xt = as<T>(x), pt = as<T>(p), dyt = as<T>(dy);
    auto const y = experts.forward(xt, pt, counts);
    auto const grads = experts.backward(dyt);
    RefInput const in{weights_of(experts), kF / etp, x, p, counts};
    auto const ref = reference_forward(in, form_of<Act>());
    auto const ref_g = reference_backward(in, form_of<Act>(), dy);
    add_to(y_sum, to_double(y));
    add_to(dx_sum, to_double(grads.input));
    add_to(dp_sum, to_double(grads.probs));
    add_to(ref_y, ref);
    add_to(ref_dx, ref_g.dx);
    add_to(ref_dp, ref_g.dp);
    auto const dw = weight_grads_of(experts);
    for (int l = 0; l < kLocal; ++l) {
      INFO("local expert " << l);
      auto const& want = ref_g.dw[static_cast<std::size_t>(l)];
      auto const& got = dw[static_cast<std::size_t>(l)];
      if (counts[static_cast<std::size_t>(l)] == 0) {
        CHECK(got.w1 == std::vector<double>(got.w1.size(), 0.0));
        CHECK(got.w2 == std::vector<double>(got.w2.size(), 0.0));
      } else {
        CHECK(rel_err(got.w1, want.w1) < tol);
        CHECK(rel_err(got.w2, want.w2) < tol);
      }
    }
  }
  INFO("ETP " << etp << ", sums over the shards");
  CHECK(rel_err(y_sum, ref_y) < tol);
  CHECK(rel_err(dx_sum, ref_dx) < tol);
  CHECK(rel_err(dp_sum, ref_dp) < tol);
  return y_sum;
}

// ------------------------------------------------------------------------------------------------
// Capacity
// ------------------------------------------------------------------------------------------------

/// Capacity factors as quarters, cf = q/4, so C = ceil(T·K·q / (4·E)) is exact integer arithmetic.
int constexpr kQuarters[] = {2, 4, 5, 8};  // cf = 0.5, 1.0, 1.25, 2.0

std::int64_t capacity_of(std::int64_t t, int k, std::int64_t e, int quarters) {
  std::int64_t const num = t * k * quarters, den = 4 * e;
  return (num + den - 1) / den;
}

enum class Keep { highest_probs, earliest_positions };

/// The routing `in` after dropping, per expert column: the routed tokens sorted by probability
/// (descending, ties: lower token first) or by position, the first C kept and the rest dropped
/// (`none`, prob 0); with `pad`, the expert is then filled up to exactly C entries with the
/// lowest-index unrouted tokens as `padding`, prob 0. With C > T the routing is unchanged.
template <class Real>
Routing<Real> reference_capacity(Routing<Real> const& in, std::int64_t c, Keep keep, bool pad) {
  Routing<Real> out = in;
  std::int64_t const t_n = in.num_tokens, e_n = in.num_experts;
  if (c > t_n) return out;
  auto at = [&](std::int64_t t, std::int64_t e) { return static_cast<std::size_t>(t * e_n + e); };
  for (std::int64_t e = 0; e < e_n; ++e) {
    std::vector<std::int64_t> routed, unrouted;
    for (std::int64_t t = 0; t < t_n; ++t)
      (in.map[at(t, e)] == Route::routed ? routed : unrouted).push_back(t);
    if (keep == Keep::highest_probs)
      std::sort(routed.begin(), routed.end(), [&](std::int64_t a, std::int64_t b) {
        Real const pa = in.probs[at(a, e)], pb = in.probs[at(b, e)];
        return pa > pb || (pa == pb && a < b);
      });
    for (std::size_t i = 0; i < routed.size(); ++i)
      if (static_cast<std::int64_t>(i) >= c) {
        out.map[at(routed[i], e)] = Route::none;
        out.probs[at(routed[i], e)] = Real(0);
      }
    if (pad) {
      std::int64_t const kept = std::min<std::int64_t>(c, static_cast<std::int64_t>(routed.size()));
      for (std::int64_t i = 0; i < c - kept; ++i) {
        out.map[at(unrouted[static_cast<std::size_t>(i)], e)] = Route::padding;
        out.probs[at(unrouted[static_cast<std::size_t>(i)], e)] = Real(0);
      }
    }
  }
  return out;
}

/// A random top-K routing: K distinct experts per token, probabilities uniform in (0, 1), or
/// drawn from {0.25, 0.5} when `ties` (so that many entries of a column are equal).
template <class Real>
Routing<Real> random_routing(std::int64_t t_n, std::int64_t e_n, int k, bool ties,
                             std::mt19937_64& rng) {
  std::vector<int> ids;
  std::vector<Real> probs;
  std::vector<int> experts(static_cast<std::size_t>(e_n));
  std::uniform_real_distribution<double> u(0.001, 1.0);
  for (std::int64_t t = 0; t < t_n; ++t) {
    for (std::size_t e = 0; e < experts.size(); ++e) experts[e] = static_cast<int>(e);
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int j = 0; j < k; ++j) {
      ids.push_back(experts[static_cast<std::size_t>(j)]);
      probs.push_back(ties ? Real(rng() % 2 == 0 ? 0.25 : 0.5) : static_cast<Real>(u(rng)));
    }
  }
  return Routing<Real>::from_top_k(t_n, e_n, k, ids, probs);
}

/// The map as text, one token per line: '.' none, 'r' routed, 'p' padding.
template <class Real>
std::string picture(Routing<Real> const& r) {
  std::string s;
  for (std::size_t i = 0; i < r.map.size(); ++i) {
    if (i % static_cast<std::size_t>(r.num_experts) == 0) s += '\n';
    s += r.map[i] == Route::none ? '.' : r.map[i] == Route::routed ? 'r' : 'p';
  }
  return s;
}

int count_of(std::vector<Route> const& map, Route which) {
  return static_cast<int>(std::count(map.begin(), map.end(), which));
}

/// Counts of the regimes a sweep went through, so that it provably exercised each.
struct Regimes {
  int cases = 0, dropped = 0, padded = 0, c_above_t = 0, pad_errors = 0;
};

/// Every (T, E, K, cf, pad) of the sweep, several random routings each, against the reference.
template <class Real, class Policy>
Regimes sweep(Keep keep, bool ties, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Regimes seen;
  for (std::int64_t t_n : {1, 5, 16, 33})
    for (std::int64_t e_n : {2, 4, 8})
      for (int k : {1, 2})
        for (int q : kQuarters)
          for (bool pad : {false, true})
            for (int rep = 0; rep < 4; ++rep) {
              double const cf = q / 4.0;
              std::int64_t const c = capacity_of(t_n, k, e_n, q);
              auto const routing = random_routing<Real>(t_n, e_n, k, ties, rng);
              auto got = routing;
              Policy const policy{.capacity_factor = cf, .pad_to_capacity = pad};
              INFO("T " << t_n << ", E " << e_n << ", K " << k << ", cf " << cf << ", pad " << pad
                        << ", C " << c << ", repeat " << rep);
              ++seen.cases;
              if (pad && c > t_n) {
                ++seen.pad_errors;
                auto const msg = test::error_of([&] { apply_capacity(policy, got, k); });
                CHECK_THAT(msg, Contains(std::to_string(c)) && Contains(std::to_string(t_n)));
                continue;
              }
              std::optional<std::int64_t> returned;
              CHECK_NOTHROW(returned = apply_capacity(policy, got, k));
              auto const want = reference_capacity(routing, c, keep, pad);
              CHECK(returned.value_or(-1) == c);
              CHECK(picture(got) == picture(want));
              CHECK(got.probs == want.probs);
              if (c > t_n) ++seen.c_above_t;
              if (count_of(want.map, Route::routed) < count_of(routing.map, Route::routed))
                ++seen.dropped;
              if (count_of(want.map, Route::padding) > 0) ++seen.padded;
            }
  return seen;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Experts
// ------------------------------------------------------------------------------------------------

TEST_CASE(
    "ETP shard r of a SwiGLU expert's fc1 is [W_gate rows r·F/ETP…, W_up rows r·F/ETP…], "
    "fc2 its columns r·F/ETP…",
    "[reference][experts]") {
  GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, double> whole(experts_config(1, 0), 7);
  std::int64_t const fr = kF / 2;
  for (int r = 0; r < 2; ++r) {
    GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, double> shard(experts_config(2, r), 7);
    for (int l = 0; l < kLocal; ++l) {
      int const e = kFirst + l;
      INFO("shard " << r << ", expert " << e);
      auto const& w1 = param_named(whole, fc1_name(e)).value;  // global [2F, H]: [W_gate; W_up]
      auto const& w2 = param_named(whole, fc2_name(e)).value;  // global [H, F]
      auto const& s1 = param_named(shard, fc1_name(e));
      auto const& s2 = param_named(shard, fc2_name(e));
      REQUIRE(s1.value.size() == static_cast<std::size_t>(2 * fr * kH));
      REQUIRE(s2.value.size() == static_cast<std::size_t>(kH * fr));
      for (std::int64_t j = 0; j < fr; ++j)
        for (std::int64_t c = 0; c < kH; ++c) {
          // local row j: gate row r·fr + j; local row fr + j: up row F + r·fr + j
          CHECK(s1.value[static_cast<std::size_t>(j * kH + c)] ==
                w1[static_cast<std::size_t>((r * fr + j) * kH + c)]);
          CHECK(s1.value[static_cast<std::size_t>((fr + j) * kH + c)] ==
                w1[static_cast<std::size_t>((kF + r * fr + j) * kH + c)]);
        }
      for (std::int64_t o = 0; o < kH; ++o)
        for (std::int64_t j = 0; j < fr; ++j)
          CHECK(s2.value[static_cast<std::size_t>(o * fr + j)] ==
                w2[static_cast<std::size_t>(o * kF + r * fr + j)]);
      CHECK(s1.global_rows == 2 * kF);
      CHECK(s1.global_cols == kH);
      CHECK(s2.global_rows == kH);
      CHECK(s2.global_cols == kF);
    }
  }
}

TEST_CASE("the hand-written reference's gradients agree with finite differences of its forward",
          "[reference][experts]") {
  for (Form form : {Form::swiglu, Form::gelu}) {
    INFO((form == Form::swiglu ? "swiglu" : "gelu"));
    std::int64_t const fr = 2, g = gated(form) ? 2 : 1;
    RefInput in;
    in.fr = fr;
    in.counts = {1, 0, 2};
    for (int l = 0; l < kLocal; ++l)
      in.w.push_back({uniform(static_cast<std::size_t>(g * fr * kH), 200 + l),
                      uniform(static_cast<std::size_t>(kH * fr), 300 + l)});
    in.x = uniform(3 * kH, 401);
    in.p = uniform(3, 402, 0.1, 1.0);
    auto const dy = uniform(3 * kH, 403);
    auto const grads = reference_backward(in, form, dy);
    auto loss = [&] {
      auto const y = reference_forward(in, form);
      double s = 0;
      for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
      return s;
    };
    auto fd_of = [&](std::vector<double>& v) {
      std::vector<double> d(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) d[i] = test::central_difference(v[i], loss);
      return d;
    };
    CHECK(rel_err(grads.dx, fd_of(in.x)) < 1e-7);
    CHECK(rel_err(grads.dp, fd_of(in.p)) < 1e-7);
    for (int l : {0, 2}) {
      CHECK(rel_err(grads.dw[static_cast<std::size_t>(l)].w1,
                    fd_of(in.w[static_cast<std::size_t>(l)].w1)) < 1e-7);
      CHECK(rel_err(grads.dw[static_cast<std::size_t>(l)].w2,
                    fd_of(in.w[static_cast<std::size_t>(l)].w2)) < 1e-7);
    }
  }
}

TEMPLATE_TEST_CASE(
    "experts equal the hand-written reference (SwiGLU: silu(first half of fc1) · second half, "
    "GeLU: erf form) in output and every gradient, for ETP 1 and summed over 2 ETP shards",
    "[reference][experts]", SwiGLU, GeLU) {
  SECTION("double") {
    auto const y1 = check_shards_against_reference<TestType, double>(1, 1e-12);
    auto const y2 = check_shards_against_reference<TestType, double>(2, 1e-12);
    // The shards hold slices of the same global experts, so ETP 2 sums to ETP 1.
    CHECK(rel_err(y2, y1) < 1e-12);
  }
  SECTION("float") {
    check_shards_against_reference<TestType, float>(1, 2e-6);
    check_shards_against_reference<TestType, float>(2, 2e-6);
  }
}

TEMPLATE_TEST_CASE(
    "the reference tells the right activation from the near misses: gate and up "
    "swapped, GeLU's tanh approximation",
    "[reference][experts]", SwiGLU, GeLU) {
  // Guards the tolerance above: the wrong forms are far from the experts' output.
  std::vector<std::int64_t> const counts{2, 0, 3};
  auto const x = uniform(5 * kH, 101);
  auto const p = uniform(5, 102, 0.1, 1.0);
  GroupedGemmExperts<test::Exec, TestType, BlasGroupedGemm, double> experts(experts_config(1, 0), 7);
  auto const y = experts.forward(x, p, counts);
  RefInput const in{weights_of(experts), kF, x, p, counts};
  Form const right = form_of<TestType>();
  Form const wrong = right == Form::swiglu ? Form::swiglu_gate_up_swapped : Form::gelu_tanh;
  CHECK(rel_err(y, reference_forward(in, right)) < 1e-12);
  CHECK(rel_err(y, reference_forward(in, wrong)) > 1e-6);
}

// ------------------------------------------------------------------------------------------------
// Capacity
// ------------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE(
    "DropByProbs keeps each expert's C = ceil(T·K/E·cf) highest-probability tokens "
    "and pads with the lowest unrouted tokens, over random routings",
    "[reference][capacity]", float, double) {
  auto const seen = sweep<TestType, DropByProbs>(Keep::highest_probs, false, 11);
  CHECK(seen.cases == 4 * 3 * 2 * 4 * 2 * 4);
  CHECK(seen.dropped > 100);
  CHECK(seen.padded > 100);
  CHECK(seen.c_above_t > 10);
  CHECK(seen.pad_errors > 10);
}

TEMPLATE_TEST_CASE(
    "DropByPosition keeps each expert's C = ceil(T·K/E·cf) earliest tokens and pads "
    "with the lowest unrouted tokens, over random routings",
    "[reference][capacity]", float, double) {
  auto const seen = sweep<TestType, DropByPosition>(Keep::earliest_positions, false, 12);
  CHECK(seen.dropped > 100);
  CHECK(seen.padded > 100);
}

TEMPLATE_TEST_CASE(
    "DropByPosition ignores the probabilities: with many equal probabilities it "
    "still keeps the earliest tokens",
    "[reference][capacity]", float, double) {
  auto const seen = sweep<TestType, DropByPosition>(Keep::earliest_positions, true, 13);
  CHECK(seen.dropped > 100);
}

TEST_CASE("with capacity C > T every routed token is kept unchanged", "[reference][capacity]") {
  // T = 5, E = 4, K = 2, cf = 3: C = ceil(5·2/4·3) = 8 > 5.
  std::mt19937_64 rng(5);
  auto const routing = random_routing<double>(5, 4, 2, false, rng);
  for (bool by_probs : {true, false}) {
    auto got = routing;
    auto const c = by_probs ? apply_capacity(DropByProbs{.capacity_factor = 3.0}, got, 2)
                            : apply_capacity(DropByPosition{.capacity_factor = 3.0}, got, 2);
    CHECK(c.value_or(-1) == 8);
    CHECK(picture(got) == picture(routing));
    CHECK(got.probs == routing.probs);
  }
}

TEST_CASE("pad-to-capacity with capacity C > T is an error naming C and T",
          "[reference][capacity]") {
  // T = 33, E = 2, K = 2, cf = 2: C = ceil(33·2/2·2) = 66 > 33.
  std::mt19937_64 rng(6);
  auto routing = random_routing<float>(33, 2, 2, false, rng);
  auto const by_probs = test::error_of([&] {
    apply_capacity(DropByProbs{.capacity_factor = 2.0, .pad_to_capacity = true}, routing, 2);
  });
  auto const by_position = test::error_of([&] {
    apply_capacity(DropByPosition{.capacity_factor = 2.0, .pad_to_capacity = true}, routing, 2);
  });
  for (auto const& msg : {by_probs, by_position}) {
    CHECK_THAT(msg, Contains("pad-to-capacity") && Contains("66") && Contains("33"));
  }
}
