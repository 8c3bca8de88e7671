#pragma once
/// \file
/// `GroupedGemmExperts<Exec, Activation, Gemm, T>`: the routed experts of one rank — per local expert
/// an fc1 `[G·F/ETP, H]` (column-sharded over ETP; G = 2 for SwiGLU, stored as
/// [gate shard; up shard]) and an fc2 `[H, F/ETP]` (row-sharded), Megatron's `[out, in]` layout,
/// run as grouped GEMMs over each expert's contiguous rows (spec §2.7):
///
///   y1 = x·W1ᵀ  →  act  →  · prob (the token's routing probability)  →  y = ·W2ᵀ
///
/// `forward(x, counts)` skips the probability (the MoE layer applies it in the dispatcher's
/// combine); `forward(x, probs, counts)` applies it between the activation and fc2.
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

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/grouped_gemm.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/activations.hpp"
#include "moefold/ops/row_scale.hpp"

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
template <class T, MemorySpace Space = HostSpace>
struct ExpertsGrad {
  Buffer<T, Space> input;  ///< [N, H], partial over ETP
  Buffer<T, Space> probs;  ///< [N], partial over ETP; empty after a forward without probabilities
};

template <ExecutionInstance Exec, ExpertActivation Activation,
          GroupedGemmPolicy<Exec> Gemm = BlasGroupedGemm, class T = float>
class GroupedGemmExperts {
 public:
  using value_type = T;
  using exec_type = Exec;
  using Space = typename Exec::memory_space;
  static constexpr int kGates = Activation::kGates;

  /// Checks the config (throws invalid_config naming the rule) and initializes the weights
  /// from (seed, name, global index), so every folding holds slices of the same experts.
  GroupedGemmExperts(ExpertsConfig config, std::uint64_t seed)
    requires std::default_initializable<Exec>
      : GroupedGemmExperts(Exec{}, std::move(config), seed) {}
  GroupedGemmExperts(Exec exec, ExpertsConfig config, std::uint64_t seed)
      : exec_(std::move(exec)), cfg_(std::move(config)) {
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
  ParamList<T> parameters()
    requires std::same_as<Space, HostSpace>
  {
    ParamList<T> out;
    for (int l = 0; l < cfg_.num_local_experts; ++l) {
      out.push_back(&fc1_[static_cast<std::size_t>(l)]);
      out.push_back(&fc2_[static_cast<std::size_t>(l)]);
    }
    return out;
  }
  Param<T, Space>& fc1(int local) { return fc1_.at(static_cast<std::size_t>(local)); }
  Param<T, Space>& fc2(int local) { return fc2_.at(static_cast<std::size_t>(local)); }

  /// Per-microbatch saved state (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

  /// y [N, H] for rows x [N, H] grouped by local expert (`tokens_per_expert[l]` consecutive
  /// rows each) with their routing probabilities `probs` [N]. Keeps what backward needs.
  Buffer<T, Space> forward(View<T const, Space> x, View<T const, Space> probs,
                           std::span<std::int64_t const> tokens_per_expert) {
    auto y = exec_.template allocate<T>(x.size());
    forward(x, probs, tokens_per_expert, y.view());
    return y;
  }
  /// f_e(x) without probabilities: y [N, H] for rows x [N, H] grouped by local expert.
  Buffer<T, Space> forward(View<T const, Space> x, std::span<std::int64_t const> tokens_per_expert) {
    auto y = exec_.template allocate<T>(x.size());
    forward(x, tokens_per_expert, y.view());
    return y;
  }
  /// As the returning `forward`, into y [N, H].
  void forward(View<T const, Space> x, View<T const, Space> probs,
               std::span<std::int64_t const> tokens_per_expert, View<T, Space> y) {
    MOEFOLD_EXPECTS(probs.size() == x.size() / cfg_.hidden_size,
                    "GroupedGemmExperts: {} probabilities for {} rows", probs.size(),
                    x.size() / cfg_.hidden_size);
    run_forward(x, &probs, tokens_per_expert, y);
  }
  void forward(View<T const, Space> x, std::span<std::int64_t const> tokens_per_expert,
               View<T, Space> y) {
    run_forward(x, nullptr, tokens_per_expert, y);
  }

  /// From dy [N, H]: accumulates the weight gradients and returns the (ETP-partial) input and
  /// probability gradients (no probability gradient after a forward without them). Call after
  /// `forward`.
  ExpertsGrad<T, Space> backward(View<T const, Space> dy) {
    ExpertsGrad<T, Space> out{exec_.template allocate<T>(rows_ * cfg_.hidden_size),
                              exec_.template allocate<T>(with_probs_ ? rows_ : 0)};
    backward(dy, out.input.view(), out.probs.view());
    return out;
  }
  /// As the returning `backward`, into d_input [N, H] and d_probs [N] (empty without
  /// probabilities).
  void backward(View<T const, Space> dy, View<T, Space> d_input, View<T, Space> d_probs) {
    std::int64_t const h = cfg_.hidden_size, fr = local_ffn(), g = kGates * fr;
    MOEFOLD_EXPECTS(dy.size() == rows_ * h,
                    "GroupedGemmExperts::backward: dy has {} elements, forward had {} rows of {}",
                    dy.size(), rows_, h);
    MOEFOLD_EXPECTS(d_input.size() == rows_ * h && d_probs.size() == (with_probs_ ? rows_ : 0),
                    "GroupedGemmExperts::backward: outputs of {} and {} elements for {} rows of {}",
                    d_input.size(), d_probs.size(), rows_, h);
    resize(d_scaled_, rows_ * fr);
    resize(dh1_, rows_ * g);
    // dW2_l += dy_lᵀ · (act·p)_l ;  d(act·p)_l = dy_l · W2_l
    T const* fc2_in = with_probs_ ? scaled_.data() : act_.data();
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T, grad_t<T>>{.trans_a = Trans::yes, .trans_b = Trans::no, .m = h, .n = fr, .k = n,
                            .a = dy.data() + off * h, .lda = h, .b = fc2_in + off * fr,
                            .ldb = fr, .beta = 1, .c = fc2(l).grad.data(), .ldc = fr};
    }));
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::no, .m = n, .n = fr, .k = h,
                            .a = dy.data() + off * h, .lda = h, .b = fc2(l).value.data(), .ldb = fr,
                            .c = d_scaled_.data() + off * fr, .ldc = fr};
    }));
    // through the probability and the activation
    View<T const, Space> d_act = d_scaled_.view(rows_, fr);
    if (with_probs_) {
      resize(d_act_, rows_ * fr);
      ops::scale_rows_backward<Exec, T>(exec_, d_scaled_.view(rows_, fr), act_.view(rows_, fr),
                                        probs_.view(), d_act_.view(rows_, fr), d_probs);
      d_act = d_act_.view(rows_, fr);
    }
    ops::activation_backward<Activation, Exec, T>(exec_, h1_.view(rows_, g), d_act,
                                                  dh1_.view(rows_, g));
    // dW1_l += dh1_lᵀ · x_l ;  dx_l = dh1_l · W1_l
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T, grad_t<T>>{.trans_a = Trans::yes, .trans_b = Trans::no, .m = g, .n = h, .k = n,
                            .a = dh1_.data() + off * g, .lda = g, .b = x_.data() + off * h, .ldb = h,
                            .beta = 1, .c = fc1(l).grad.data(), .ldc = h};
    }));
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::no, .m = n, .n = h, .k = g,
                            .a = dh1_.data() + off * g, .lda = g, .b = fc1(l).value.data(), .ldb = h,
                            .c = d_input.data() + off * h, .ldc = h};
    }));
  }

 private:
  /// The forward, with the probabilities applied between activation and fc2 when `probs` is
  /// given.
  void run_forward(View<T const, Space> x, View<T const, Space> const* probs,
                   std::span<std::int64_t const> tokens_per_expert, View<T, Space> y) {
    std::int64_t const h = cfg_.hidden_size, fr = local_ffn(), g = kGates * fr;
    MOEFOLD_EXPECTS(x.contiguous() && y.contiguous() && (!probs || probs->contiguous()),
                    "GroupedGemmExperts: strided views");
    rows_ = check_inputs(x, tokens_per_expert);
    MOEFOLD_EXPECTS(y.size() == rows_ * h, "GroupedGemmExperts: output has {} elements, expected {} rows × {}",
                    y.size(), rows_, h);
    with_probs_ = probs != nullptr;
    counts_.assign(tokens_per_expert.begin(), tokens_per_expert.end());
    resize(x_, x.size());
    copy<T>(exec_, x.reshaped(1, x.size()), x_.view());
    resize(h1_, rows_ * g);
    resize(act_, rows_ * fr);

    // fc1: h1_l = x_l · W1_lᵀ
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::yes, .m = n, .n = g, .k = h,
                            .a = x_.data() + off * h, .lda = h, .b = fc1(l).value.data(), .ldb = h,
                            .c = h1_.data() + off * g, .ldc = g};
    }));
    // activation, then the routing probability
    ops::activation_forward<Activation, Exec, T>(exec_, h1_.view(rows_, g), act_.view(rows_, fr));
    T const* fc2_in = act_.data();
    if (with_probs_) {
      resize(probs_, rows_);
      copy<T>(exec_, probs->reshaped(1, probs->size()), probs_.view());
      resize(scaled_, rows_ * fr);
      ops::scale_rows<Exec, T>(exec_, act_.view(rows_, fr), probs_.view(), scaled_.view(rows_, fr));
      fc2_in = scaled_.data();
    }
    // fc2: y_l = (act · p)_l · W2_lᵀ
    run(per_expert([&](int l, std::int64_t off, std::int64_t n) {
      return GemmProblem<T>{.trans_a = Trans::no, .trans_b = Trans::yes, .m = n, .n = h, .k = fr,
                            .a = fc2_in + off * fr, .lda = fr, .b = fc2(l).value.data(),
                            .ldb = fr, .c = y.data() + off * h, .ldc = h};
    }));
  }

  /// A reusable buffer of n elements (reallocated only when the size changes).
  void resize(Buffer<T, Space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<T>(n);
  }

  std::int64_t check_inputs(View<T const, Space> x, std::span<std::int64_t const> counts) const {
    MOEFOLD_EXPECTS(static_cast<int>(counts.size()) == cfg_.num_local_experts,
                    "GroupedGemmExperts: tokens_per_expert has {} entries for {} local experts",
                    counts.size(), cfg_.num_local_experts);
    std::int64_t n = 0;
    for (std::size_t l = 0; l < counts.size(); ++l) {
      MOEFOLD_EXPECTS(counts[l] >= 0, "GroupedGemmExperts: tokens_per_expert[{}] = {} is negative",
                      l, counts[l]);
      n += counts[l];
    }
    MOEFOLD_EXPECTS(x.size() == n * cfg_.hidden_size,
                    "GroupedGemmExperts: input has {} elements, expected {} rows × {}", x.size(), n,
                    cfg_.hidden_size);
    return n;
  }

  /// One problem per local expert with rows, from make(l, first_row, rows).
  template <class Make>
  auto per_expert(Make make) {
    std::vector<decltype(make(0, std::int64_t{0}, std::int64_t{0}))> ps;
    ps.reserve(counts_.size());
    std::int64_t off = 0;
    for (int l = 0; l < cfg_.num_local_experts; ++l) {
      std::int64_t const n = counts_[static_cast<std::size_t>(l)];
      if (n > 0) ps.push_back(make(l, off, n));
      off += n;
    }
    return ps;
  }

  template <class C>
  void run(std::vector<GemmProblem<T, C>> const& ps) {
    grouped_gemm<Gemm>(exec_, std::span<GemmProblem<T, C> const>(ps), workspace_);
  }
  auto saved() { return std::tie(rows_, with_probs_, counts_, x_, probs_, h1_, act_, scaled_); }

  Exec exec_;
  ExpertsConfig cfg_;
  std::vector<Param<T, Space>> fc1_, fc2_;
  // saved by forward for backward
  std::int64_t rows_ = 0;
  bool with_probs_ = false;
  std::vector<std::int64_t> counts_;
  Buffer<T, Space> x_, probs_, h1_, act_, scaled_;
  // backward's temporaries, reused
  Buffer<T, Space> d_scaled_, d_act_, dh1_;
  Buffer<std::byte, Space> workspace_;
  MicrobatchStash stash_;
};

namespace cpu {
template <ExpertActivation Activation, GroupedGemmPolicy Gemm = BlasGroupedGemm, class T = float>
using GroupedGemmExperts = moefold::GroupedGemmExperts<Cpu, Activation, Gemm, T>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
