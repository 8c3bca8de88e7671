#pragma once
// Shared shapes and routings of the MoE benchmarks: T = 16384 tokens, H = 1024, E = 64, top-8,
// fp32; routing uniform or Zipf-skewed (expert e chosen with weight 1/(e+1)^1.2).

#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "moefold/moe/routing.hpp"

namespace moefold::bench {

constexpr std::int64_t kTokens = 16384, kHidden = 1024;
constexpr int kExperts = 64, kTopK = 8;
using Clock = std::chrono::steady_clock;

/// Routing of `tokens` tokens: K distinct experts each, probs uniform in [0.1, 1).
inline Routing<float> bench_routing(std::int64_t tokens, bool zipf, unsigned seed = 1) {
  std::mt19937 rng(seed);
  std::vector<double> w(kExperts);
  for (int e = 0; e < kExperts; ++e) w[e] = zipf ? 1.0 / std::pow(e + 1.0, 1.2) : 1.0;
  std::discrete_distribution<int> pick(w.begin(), w.end());
  std::uniform_real_distribution<float> prob(0.1f, 1.0f);
  std::vector<int> ids;
  std::vector<float> probs;
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<bool> used(kExperts, false);
    for (int k = 0; k < kTopK; ++k) {
      int e = pick(rng);
      while (used[static_cast<std::size_t>(e)]) e = pick(rng);
      used[static_cast<std::size_t>(e)] = true;
      ids.push_back(e);
      probs.push_back(prob(rng));
    }
  }
  return Routing<float>::from_top_k(tokens, kExperts, kTopK, ids, probs);
}

inline std::vector<float> bench_tensor(std::size_t n, unsigned seed = 2) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

}  // namespace moefold::bench
