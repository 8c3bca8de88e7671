#pragma once
/// \file
/// `GroupedGemmExperts<Activation, Gemm, T>`: the routed experts of one rank — per local expert
/// an fc1 `[G·F/ETP, H]` (column-sharded over ETP; G = 2 for SwiGLU, stored as
/// [gate shard; up shard]) and an fc2 `[H, F/ETP]` (row-sharded), Megatron's `[out, in]` layout,
/// run as grouped GEMMs over each expert's contiguous rows (spec §2.7):
///
///   y1 = x·W1ᵀ  →  act  →  · prob (the token's routing probability)  →  y = ·W2ᵀ
///
/// With ETP > 1 the output is a partial sum over the ETP group (the dispatcher's
/// ReduceScatter-V adds the partials); likewise the input and probability gradients returned by
/// `backward` are partial sums that the dispatcher's backward reduces. The experts themselves do
/// no communication.

#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/ops/activations.hpp"
#include "moefold/exec/grouped_gemm.hpp"
#include "moefold/core/param.hpp"

namespace moefold {
inline namespace v0 {

/// The shapes and placement of one rank's experts.
struct ExpertsConfig {
  int num_local_experts = 1;       ///< L = num_experts / EP
  int first_expert = 0;            ///< global id of local expert 0 (EP rank · L)
  std::int64_t hidden_size = 0;    ///< H
  std::int64_t ffn_hidden_size = 0;  ///< F, Megatron's moe_ffn_hidden_size (global, before ETP)
  int etp_size = 1;                ///< expert tensor parallel size
  int etp_rank = 0;                ///< this rank's ETP coordinate
  std::string name_prefix = "experts";  ///< parameters are "<prefix>.linear_fc1.weight<e>", …
  double init_std = 0.02;          ///< normal initialization of both weights
};

/// The experts' input and probability gradients from `backward`.
template <class T>
struct ExpertsGrad {
  std::vector<T> input;  ///< [N, H], partial over ETP
  std::vector<T> probs;  ///< [N], partial over ETP
};

template <ExpertActivation Activation, GroupedGemmPolicy Gemm = BlasGroupedGemm, class T = float>
class GroupedGemmExperts {
 public:
  using value_type = T;
  static constexpr int kGates = Activation::kGates;

  /// Checks the config (throws invalid_config naming the rule) and initializes the weights
  /// from (seed, name, global index), so every folding holds slices of the same experts.
  GroupedGemmExperts(ExpertsConfig config, std::uint64_t seed) : cfg_(std::move(config)) {
    auto bad = [](std::string const& m) { throw invalid_config("GroupedGemmExperts: " + m); };
    if (cfg_.num_local_experts < 1) bad(fmt::format("num_local_experts must be ≥ 1 (got {})", cfg_.num_local_experts));
    if (cfg_.hidden_size < 1 || cfg_.ffn_hidden_size < 1)
      bad(fmt::format("hidden_size ({}) and ffn_hidden_size ({}) must be ≥ 1", cfg_.hidden_size,
                      cfg_.ffn_hidden_size));
    if (cfg_.etp_size < 1 || cfg_.etp_rank < 0 || cfg_.etp_rank >= cfg_.etp_size)
      bad(fmt::format("etp_rank {} is outside [0, etp_size = {})", cfg_.etp_rank, cfg_.etp_size));
    if (cfg_.ffn_hidden_size % cfg_.etp_size != 0)
      bad(fmt::format("moe_ffn_hidden_size ({}) is not divisible by expert_tensor_parallel_size "
                      "({})",
                      cfg_.ffn_hidden_size, cfg_.etp_size));
    std::int64_t const h = cfg_.hidden_size, f = cfg_.ffn_hidden_size, fr = local_ffn();
    std::int64_t const r0 = cfg_.etp_rank * fr;
    for (int l = 0; l < cfg_.num_local_experts; ++l) {
      int const e = cfg_.first_expert + l;
      std::vector<ParamBlock> fc1_blocks{{.row0 = r0, .rows = fr, .col0 = 0, .cols = h}};
      if (kGates == 2) fc1_blocks.push_back({.row0 = f + r0, .rows = fr, .col0 = 0, .cols = h});
      fc1_.emplace_back(fmt::format("{}.linear_fc1.weight{}", cfg_.name_prefix, e),
                        ParamClass::expert, kGates * f, h, std::move(fc1_blocks));
      fc2_.emplace_back(fmt::format("{}.linear_fc2.weight{}", cfg_.name_prefix, e),
                        ParamClass::expert, h, f,
                        std::vector<ParamBlock>{{.row0 = 0, .rows = h, .col0 = r0, .cols = fr}});
      fc1_.back().init(seed, InitDist::normal, cfg_.init_std);
      fc2_.back().init(seed, InitDist::normal, cfg_.init_std);
    }
  }

  ExpertsConfig const& config() const noexcept { return cfg_; }
  /// F / ETP: this rank's share of each expert's hidden width.
  std::int64_t local_ffn() const noexcept { return cfg_.ffn_hidden_size / cfg_.etp_size; }

  /// fc1 and fc2 of every local expert, in a fixed order.
  ParamList<T> parameters() {
    ParamList<T> out;
    for (int l = 0; l < cfg_.num_local_experts; ++l) {
      out.push_back(&fc1_[static_cast<std::size_t>(l)]);
      out.push_back(&fc2_[static_cast<std::size_t>(l)]);
    }
    return out;
  }
  Param<T>& fc1(int local) { return fc1_.at(static_cast<std::size_t>(local)); }
  Param<T>& fc2(int local) { return fc2_.at(static_cast<std::size_t>(local)); }

  /// y [N, H] for rows x [N, H] grouped by local expert (`tokens_per_expert[l]` consecutive
  /// rows each) with their routing probabilities `probs` [N]. Keeps what backward needs.
  std::vector<T> forward(std::span<T const> x, std::span<T const> probs,
                         std::span<std::int64_t const> tokens_per_expert) {
    std::int64_t const h = cfg_.hidden_size, fr = local_ffn(), g = kGates * fr;
    rows_ = check_inputs(x, probs, tokens_per_expert);
    counts_.assign(tokens_per_expert.begin(), tokens_per_expert.end());
    x_.assign(x.begin(), x.end());
    probs_.assign(probs.begin(), probs.end());
    h1_.assign(static_cast<std::size_t>(rows_ * g), T{});
    act_.assign(static_cast<std::size_t>(rows_ * fr), T{});
    scaled_.assign(static_cast<std::size_t>(rows_ * fr), T{});
    std::vector<T> y(static_cast<std::size_t>(rows_ * h), T{});

    // fc1: h1_l = x_l · W1_lᵀ
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::yes, .m = n, .n = g, .k = h,
                            .a = x_.data() + off * h, .lda = h, .b = fc1(l).value.data(), .ldb = h,
                            .c = h1_.data() + off * g, .ldc = g};
    }));
    // activation, then the routing probability
    for (std::int64_t i = 0; i < rows_; ++i) {
      T* a = act_.data() + i * fr;
      for (std::int64_t j = 0; j < fr; ++j) Activation::forward(h1_.data() + i * g, fr, j, a);
      T const p = probs_[static_cast<std::size_t>(i)];
      for (std::int64_t j = 0; j < fr; ++j) scaled_[static_cast<std::size_t>(i * fr + j)] = a[j] * p;
    }
    // fc2: y_l = (act · p)_l · W2_lᵀ
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::yes, .m = n, .n = h, .k = fr,
                            .a = scaled_.data() + off * fr, .lda = fr, .b = fc2(l).value.data(),
                            .ldb = fr, .c = y.data() + off * h, .ldc = h};
    }));
    return y;
  }

  /// From dy [N, H]: accumulates the weight gradients and returns the (ETP-partial) input and
  /// probability gradients. Call after `forward`.
  ExpertsGrad<T> backward(std::span<T const> dy) {
    std::int64_t const h = cfg_.hidden_size, fr = local_ffn(), g = kGates * fr;
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(dy.size()) == rows_ * h,
                    "GroupedGemmExperts::backward: dy has {} elements, forward had {} rows of {}",
                    dy.size(), rows_, h);
    std::vector<T> d_scaled(static_cast<std::size_t>(rows_ * fr), T{});
    std::vector<T> dh1(static_cast<std::size_t>(rows_ * g), T{});
    ExpertsGrad<T> out{std::vector<T>(static_cast<std::size_t>(rows_ * h), T{}),
                       std::vector<T>(static_cast<std::size_t>(rows_), T{})};
    // dW2_l += dy_lᵀ · (act·p)_l ;  d(act·p)_l = dy_l · W2_l
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::yes, .trans_b = Trans::no, .m = h, .n = fr, .k = n,
                            .a = dy.data() + off * h, .lda = h, .b = scaled_.data() + off * fr,
                            .ldb = fr, .beta = T(1), .c = fc2(l).grad.data(), .ldc = fr};
    }));
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::no, .m = n, .n = fr, .k = h,
                            .a = dy.data() + off * h, .lda = h, .b = fc2(l).value.data(), .ldb = fr,
                            .c = d_scaled.data() + off * fr, .ldc = fr};
    }));
    // through the probability and the activation
    std::vector<T> d_act(static_cast<std::size_t>(fr));
    for (std::int64_t i = 0; i < rows_; ++i) {
      T const p = probs_[static_cast<std::size_t>(i)];
      T dp{};
      for (std::int64_t j = 0; j < fr; ++j) {
        T const ds = d_scaled[static_cast<std::size_t>(i * fr + j)];
        dp += ds * act_[static_cast<std::size_t>(i * fr + j)];
        d_act[static_cast<std::size_t>(j)] = ds * p;
      }
      out.probs[static_cast<std::size_t>(i)] = dp;
      for (std::int64_t j = 0; j < fr; ++j)
        Activation::backward(h1_.data() + i * g, d_act.data(), fr, j, dh1.data() + i * g);
    }
    // dW1_l += dh1_lᵀ · x_l ;  dx_l = dh1_l · W1_l
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::yes, .trans_b = Trans::no, .m = g, .n = h, .k = n,
                            .a = dh1.data() + off * g, .lda = g, .b = x_.data() + off * h, .ldb = h,
                            .beta = T(1), .c = fc1(l).grad.data(), .ldc = h};
    }));
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::no, .m = n, .n = h, .k = g,
                            .a = dh1.data() + off * g, .lda = g, .b = fc1(l).value.data(), .ldb = h,
                            .c = out.input.data() + off * h, .ldc = h};
    }));
    return out;
  }

 private:
  std::int64_t check_inputs(std::span<T const> x, std::span<T const> probs,
                            std::span<std::int64_t const> counts) const {
    MOEFOLD_EXPECTS(static_cast<int>(counts.size()) == cfg_.num_local_experts,
                    "GroupedGemmExperts: tokens_per_expert has {} entries for {} local experts",
                    counts.size(), cfg_.num_local_experts);
    std::int64_t n = 0;
    for (std::size_t l = 0; l < counts.size(); ++l) {
      MOEFOLD_EXPECTS(counts[l] >= 0, "GroupedGemmExperts: tokens_per_expert[{}] = {} is negative",
                      l, counts[l]);
      n += counts[l];
    }
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(x.size()) == n * cfg_.hidden_size,
                    "GroupedGemmExperts: input has {} elements, expected {} rows × {}", x.size(), n,
                    cfg_.hidden_size);
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(probs.size()) == n,
                    "GroupedGemmExperts: {} probabilities for {} rows", probs.size(), n);
    return n;
  }

  /// One problem per local expert with rows, from make(l, first_row, rows).
  template <class Make>
  std::vector<GemmProblem<T>> per_expert(Make make) {
    std::vector<GemmProblem<T>> ps;
    ps.reserve(counts_.size());
    std::int64_t off = 0;
    for (int l = 0; l < cfg_.num_local_experts; ++l) {
      std::int64_t const n = counts_[static_cast<std::size_t>(l)];
      if (n > 0) ps.push_back(make(l, off, n));
      off += n;
    }
    return ps;
  }

  void run(std::vector<GemmProblem<T>> const& ps) {
    grouped_gemm<Gemm>(Cpu{}, std::span<GemmProblem<T> const>(ps), workspace_);
  }

  ExpertsConfig cfg_;
  std::vector<Param<T>> fc1_, fc2_;
  // saved by forward for backward
  std::int64_t rows_ = 0;
  std::vector<std::int64_t> counts_;
  std::vector<T> x_, probs_, h1_, act_, scaled_;
  Buffer<std::byte> workspace_;
};

}  // namespace v0
}  // namespace moefold
