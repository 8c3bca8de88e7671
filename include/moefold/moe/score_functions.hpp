#pragma once
/// \file
/// Router score functions as policy types (spec §2.2 step 4): `SoftmaxScore` (variants: top-k
/// on the logits then softmax over the K chosen, or softmax over all E then top-k, chosen by
/// `moe_router_pre_softmax`) and `SigmoidScore` (chosen scores normalized to sum 1 when K > 1).
/// Each gives, per token: the values top-k ranks, the probabilities of the chosen experts, their
/// backward, and the scores the load-balancing losses use, with their backward.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <span>

#include "moefold/moe/router_config.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// out = softmax(x), stable (max subtracted).
template <class Real>
void softmax_row(std::span<Real const> x, std::span<Real> out) {
  Real m = x[0];
  for (Real v : x) m = std::max(m, v);
  Real s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += (out[i] = std::exp(x[i] - m));
  Real const inv = Real(1) / s;
  for (auto& v : out) v *= inv;
}
template <class Real>
Real sigmoid(Real x) {
  return Real(1) / (Real(1) + std::exp(-x));
}
}  // namespace detail

/// Softmax scores. Without `moe_router_pre_softmax`: top-k on the raw logits, then a softmax
/// over the K chosen logits. With it: softmax over all E, then top-k, no renormalization.
struct SoftmaxScore {
  static constexpr ScoreFunction kind = ScoreFunction::softmax;
  static constexpr bool accepts(ScoreFunction f) noexcept { return f == kind; }

  /// The values top-k ranks, `sel[E]` (`bias` is unused: expert bias needs sigmoid).
  template <class Real>
  static void selection_values(RouterConfig const& cfg, std::span<Real const> logits,
                               std::span<Real const> /*bias*/, std::span<Real> sel) {
    if (cfg.moe_router_pre_softmax)
      detail::softmax_row(logits, sel);
    else
      std::copy(logits.begin(), logits.end(), sel.begin());
  }

  /// Unscaled probabilities `probs[K]` of the chosen experts `idx[K]`; `scratch[E]`.
  template <class Real>
  static void probs(RouterConfig const& cfg, std::span<Real const> logits, std::span<int const> idx,
                    std::span<Real> probs, std::span<Real> scratch) {
    if (cfg.moe_router_pre_softmax) {
      detail::softmax_row(logits, scratch);
      for (std::size_t k = 0; k < idx.size(); ++k)
        probs[k] = scratch[static_cast<std::size_t>(idx[k])];
    } else {
      for (std::size_t k = 0; k < idx.size(); ++k)
        scratch[k] = logits[static_cast<std::size_t>(idx[k])];
      detail::softmax_row(std::span<Real const>(scratch.data(), idx.size()), probs);
    }
  }

  /// Adds d(Σ_k d_probs[k]·probs[k]) / d logits to `d_logits[E]`; `scratch[E]`.
  template <class Real>
  static void backward(RouterConfig const& cfg, std::span<Real const> logits,
                       std::span<int const> idx, std::span<Real const> d_probs,
                       std::span<Real> d_logits, std::span<Real> scratch) {
    if (cfg.moe_router_pre_softmax) {
      detail::softmax_row(logits, scratch);
      Real dot = 0;
      for (std::size_t k = 0; k < idx.size(); ++k)
        dot += scratch[static_cast<std::size_t>(idx[k])] * d_probs[k];
      for (std::size_t e = 0; e < logits.size(); ++e) d_logits[e] -= scratch[e] * dot;
      for (std::size_t k = 0; k < idx.size(); ++k)
        d_logits[static_cast<std::size_t>(idx[k])] +=
            scratch[static_cast<std::size_t>(idx[k])] * d_probs[k];
    } else {
      auto p = scratch.first(idx.size());
      probs<Real>(cfg, logits, idx, p, scratch.subspan(idx.size()));
      Real dot = 0;
      for (std::size_t k = 0; k < idx.size(); ++k) dot += p[k] * d_probs[k];
      for (std::size_t k = 0; k < idx.size(); ++k)
        d_logits[static_cast<std::size_t>(idx[k])] += p[k] * (d_probs[k] - dot);
    }
  }

  /// Scores of the load-balancing losses: softmax over all E.
  template <class Real>
  static void aux_scores(RouterConfig const&, std::span<Real const> logits,
                         std::span<Real> scores) {
    detail::softmax_row(logits, scores);
  }
  /// Adds the gradient of Σ_e d_scores[e]·scores[e] to `d_logits`, given `scores`.
  template <class Real>
  static void aux_scores_backward(RouterConfig const&, std::span<Real const> /*logits*/,
                                  std::span<Real const> scores, std::span<Real const> d_scores,
                                  std::span<Real> d_logits) {
    Real dot = 0;
    for (std::size_t e = 0; e < scores.size(); ++e) dot += scores[e] * d_scores[e];
    for (std::size_t e = 0; e < scores.size(); ++e) d_logits[e] += scores[e] * (d_scores[e] - dot);
  }
};

/// Sigmoid scores: σ(logits); top-k on σ (+ expert bias, which selects but never weights); the
/// chosen scores divided by their sum (+1e-20) when K > 1.
struct SigmoidScore {
  static constexpr ScoreFunction kind = ScoreFunction::sigmoid;
  static constexpr bool accepts(ScoreFunction f) noexcept { return f == kind; }
  static constexpr double kEps = 1e-20;

  template <class Real>
  static void selection_values(RouterConfig const&, std::span<Real const> logits,
                               std::span<Real const> bias, std::span<Real> sel) {
    for (std::size_t e = 0; e < logits.size(); ++e)
      sel[e] = detail::sigmoid(logits[e]) + (bias.empty() ? Real(0) : bias[e]);
  }

  template <class Real>
  static void probs(RouterConfig const&, std::span<Real const> logits, std::span<int const> idx,
                    std::span<Real> probs, std::span<Real> /*scratch*/) {
    Real sum = 0;
    for (std::size_t k = 0; k < idx.size(); ++k)
      sum += (probs[k] = detail::sigmoid(logits[static_cast<std::size_t>(idx[k])]));
    if (idx.size() > 1) {
      Real const inv = Real(1) / (sum + Real(kEps));
      for (std::size_t k = 0; k < idx.size(); ++k) probs[k] *= inv;
    }
  }

  template <class Real>
  static void backward(RouterConfig const&, std::span<Real const> logits, std::span<int const> idx,
                       std::span<Real const> d_probs, std::span<Real> d_logits,
                       std::span<Real> scratch) {
    auto s = scratch.first(idx.size());
    Real sum = 0;
    for (std::size_t k = 0; k < idx.size(); ++k)
      sum += (s[k] = detail::sigmoid(logits[static_cast<std::size_t>(idx[k])]));
    Real dot = 0;
    for (std::size_t k = 0; k < idx.size(); ++k) dot += d_probs[k] * s[k];
    Real const d = sum + Real(kEps);
    for (std::size_t k = 0; k < idx.size(); ++k) {
      Real const ds = idx.size() > 1 ? d_probs[k] / d - dot / (d * d) : d_probs[k];
      d_logits[static_cast<std::size_t>(idx[k])] += ds * s[k] * (Real(1) - s[k]);
    }
  }

  /// Scores of the load-balancing losses: σ normalized by its sum over all E (+1e-20).
  template <class Real>
  static void aux_scores(RouterConfig const&, std::span<Real const> logits,
                         std::span<Real> scores) {
    Real sum = 0;
    for (std::size_t e = 0; e < logits.size(); ++e) sum += (scores[e] = detail::sigmoid(logits[e]));
    Real const inv = Real(1) / (sum + Real(kEps));
    for (auto& v : scores) v *= inv;
  }
  template <class Real>
  static void aux_scores_backward(RouterConfig const&, std::span<Real const> logits,
                                  std::span<Real const> scores, std::span<Real const> d_scores,
                                  std::span<Real> d_logits) {
    Real sum = 0, dot = 0;
    for (std::size_t e = 0; e < logits.size(); ++e) sum += detail::sigmoid(logits[e]);
    Real const d = sum + Real(kEps);
    // scores = σ/d, so Σ d_scores·σ/d² = dot(d_scores, scores)/d.
    for (std::size_t e = 0; e < logits.size(); ++e) dot += d_scores[e] * scores[e];
    for (std::size_t e = 0; e < logits.size(); ++e) {
      Real const s = detail::sigmoid(logits[e]);
      d_logits[e] += (d_scores[e] / d - dot / d) * s * (Real(1) - s);
    }
  }
};

/// The score function the configuration names (`moe_router_score_function`), chosen at run
/// time: one router type for a trainer whose score function is a command-line choice. Each call
/// is `SoftmaxScore`'s or `SigmoidScore`'s.
struct ConfiguredScore {
  static constexpr bool accepts(ScoreFunction) noexcept { return true; }

  template <class Real>
  static void selection_values(RouterConfig const& cfg, std::span<Real const> logits,
                               std::span<Real const> bias, std::span<Real> sel) {
    if (sigmoid(cfg))
      SigmoidScore::selection_values<Real>(cfg, logits, bias, sel);
    else
      SoftmaxScore::selection_values<Real>(cfg, logits, bias, sel);
  }
  template <class Real>
  static void probs(RouterConfig const& cfg, std::span<Real const> logits, std::span<int const> idx,
                    std::span<Real> probs, std::span<Real> scratch) {
    if (sigmoid(cfg))
      SigmoidScore::probs<Real>(cfg, logits, idx, probs, scratch);
    else
      SoftmaxScore::probs<Real>(cfg, logits, idx, probs, scratch);
  }
  template <class Real>
  static void backward(RouterConfig const& cfg, std::span<Real const> logits,
                       std::span<int const> idx, std::span<Real const> d_probs,
                       std::span<Real> d_logits, std::span<Real> scratch) {
    if (sigmoid(cfg))
      SigmoidScore::backward<Real>(cfg, logits, idx, d_probs, d_logits, scratch);
    else
      SoftmaxScore::backward<Real>(cfg, logits, idx, d_probs, d_logits, scratch);
  }
  template <class Real>
  static void aux_scores(RouterConfig const& cfg, std::span<Real const> logits,
                         std::span<Real> scores) {
    if (sigmoid(cfg))
      SigmoidScore::aux_scores<Real>(cfg, logits, scores);
    else
      SoftmaxScore::aux_scores<Real>(cfg, logits, scores);
  }
  template <class Real>
  static void aux_scores_backward(RouterConfig const& cfg, std::span<Real const> logits,
                                  std::span<Real const> scores, std::span<Real const> d_scores,
                                  std::span<Real> d_logits) {
    if (sigmoid(cfg))
      SigmoidScore::aux_scores_backward<Real>(cfg, logits, scores, d_scores, d_logits);
    else
      SoftmaxScore::aux_scores_backward<Real>(cfg, logits, scores, d_scores, d_logits);
  }

 private:
  static bool sigmoid(RouterConfig const& cfg) noexcept {
    return cfg.moe_router_score_function == ScoreFunction::sigmoid;
  }
};

/// A router score policy: which `moe_router_score_function` values it implements (`accepts`),
/// and per token the selection values, the probabilities, their backward, and the scores of the
/// load-balancing losses with their backward.
template <class S>
concept RouterScore = requires {
  { S::accepts(ScoreFunction::softmax) } -> std::convertible_to<bool>;
}
&&requires(RouterConfig const& c, std::span<float const> l, std::span<int const> i,
           std::span<float> o) {
  S::template selection_values<float>(c, l, l, o);
  S::template probs<float>(c, l, i, o, o);
  S::template backward<float>(c, l, i, l, o, o);
  S::template aux_scores<float>(c, l, o);
  S::template aux_scores_backward<float>(c, l, l, l, o);
};

static_assert(RouterScore<SoftmaxScore> && RouterScore<SigmoidScore> &&
              RouterScore<ConfiguredScore>);

}  // namespace v0
}  // namespace moefold
