#pragma once
/// \file
/// `Attention`: causal self-attention with grouped-query heads, rotary embeddings, tensor
/// parallelism with SP over `tp` and context parallelism over `cp`.
///
///   x [T, H] SP-local ──ColumnParallelLinear (AG tp)──▶ qkv [T·TP, (local groups)·(q/g + 2)·d]
///     → RoPE on q, k at the tokens' global positions
///     → all-gather k, v over cp (context_parallel.hpp) → causal softmax(q·kᵀ/√d)·v per head,
///       tiled with an online softmax: no S×S matrix (ops/flash_attention.hpp)
///     ──RowParallelLinear (RS tp)──▶ y [T, H] SP-local
///
/// QKV weight `[G·(N/G + 2)·d, H]` in Megatron's layout: for each query group, its N/G query
/// heads, then its key head, then its value head. Splitting the rows over TP gives each rank
/// G/TP whole groups (N/TP query heads). The projection weight is `[H, N·d]`, split by columns.
/// Backward: reduce-scatter of the key/value gradients over cp, then the linear layers'
/// reverse collectives over tp.
///
/// With `add_qkv_bias` (Megatron's `--add-qkv-bias`, Qwen2's attention bias) the QKV projection
/// has a bias `linear_qkv.bias` [1, G·(N/G + 2)·d] in the same layout, split over TP like the
/// weight's rows (class dense: each TP rank sums its columns' gradient over all its CP rank's
/// tokens), initialized to zero as Megatron does.

#include <fmt/format.h>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/context_parallel.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/nn/rotary.hpp"
#include "moefold/nn/row_parallel_linear.hpp"
#include "moefold/nn/sequence_shard.hpp"
#include "moefold/ops/bias.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/flash_attention.hpp"
#include "moefold/ops/rope.hpp"

namespace moefold {
inline namespace v0 {

/// Sizes of an attention block (Megatron's names in comments).
struct AttentionConfig {
  std::string name = "self_attention";  ///< parameter prefix, e.g. "layers.0.self_attention"
  std::int64_t hidden = 0;              ///< hidden_size H
  std::int64_t heads = 0;               ///< num_attention_heads N
  std::int64_t kv_groups = 0;           ///< num_query_groups G (0: equal to heads)
  std::int64_t head_dim = 0;            ///< kv_channels d (0: H/N)
  double rope_base = 10000.0;           ///< rotary_base
  bool add_qkv_bias = false;            ///< add_qkv_bias: a bias on the QKV projection
  std::uint64_t seed = 0;
  double init_scale = 0.02;  ///< init_method_std
};

/// Causal GQA self-attention with RoPE, TP (+SP) over `tp` and CP over `cp`.
template <ExecutionInstance Exec, class T, Communicator Comm>
class Attention {
 public:
  using Space = typename Exec::memory_space;
  using C = compute_t<T>;  ///< scores, softmax and the core's sums (FP32 for bf16)

  /// Throws `invalid_config` when heads or groups are not divisible by TP, heads not by groups,
  /// or the head dimension is odd.
  Attention(Exec exec, AttentionConfig cfg, Comm& tp, Comm& cp)
      : exec_(std::move(exec)),
        cfg_(normalized(std::move(cfg), tp.size())),
        tp_(&tp),
        cp_(&cp),
        qkv_(exec_,
             LinearConfig{.name = cfg_.name + ".linear_qkv.weight",
                          .in = cfg_.hidden,
                          .out = cfg_.kv_groups * (q_per_group() + 2) * cfg_.head_dim,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp),
        proj_(exec_,
              LinearConfig{.name = cfg_.name + ".linear_proj.weight",
                           .in = cfg_.heads * cfg_.head_dim,
                           .out = cfg_.hidden,
                           .seed = cfg_.seed,
                           .scale = cfg_.init_scale},
              tp) {
    if (cfg_.add_qkv_bias) {
      std::int64_t const w = width();
      qkv_bias_ =
          Param<T, Space>(cfg_.name + ".linear_qkv.bias", ParamClass::dense, 1, w * tp.size(),
                          {{.row0 = 0, .rows = 1, .col0 = tp.rank() * w, .cols = w}});
      qkv_bias_.init(cfg_.seed, InitDist::constant, 0.0);
    }
  }
  Attention(AttentionConfig cfg, Comm& tp, Comm& cp) requires std::default_initializable<Exec>
      : Attention(Exec{}, std::move(cfg), tp, cp) {}

  AttentionConfig const& config() const noexcept { return cfg_; }
  std::int64_t local_heads() const noexcept { return cfg_.heads / tp_->size(); }
  std::int64_t local_groups() const noexcept { return cfg_.kv_groups / tp_->size(); }

  /// x: this rank's tokens [S/(CP·TP), B, H] (SequenceShard layout) → y, same shape. `batch` is
  /// B. Throws `invalid_config` when the implied sequence S is not divisible by 2·CP·TP.
  /// Collective over `tp` and `cp`.
  void forward(View<T const, Space> x, std::int64_t batch, View<T, Space> y) {
    std::int64_t const d = cfg_.head_dim, nq = local_heads(), ng = local_groups();
    std::int64_t const rows = detail::rows_of(x, cfg_.hidden, "Attention " + cfg_.name);
    MOEFOLD_EXPECTS(batch > 0 && rows % batch == 0,
                    "Attention {}: {} tokens are not whole rows of batch {}", cfg_.name, rows,
                    batch);
    MOEFOLD_EXPECTS(y.size() == x.size(), "Attention {}: output of {} elements for {} inputs",
                    cfg_.name, y.size(), x.size());
    shard_ = SequenceShard{.seq = rows / batch * tp_->size() * cp_->size(),
                           .batch = batch,
                           .tp = tp_->size(),
                           .tp_rank = tp_->rank(),
                           .cp = cp_->size(),
                           .cp_rank = cp_->rank()};
    shard_.validate();
    std::int64_t const sc = shard_.cp_seq(), s = shard_.seq, tc = sc * batch;

    auto const qkv = detail::reuse(exec_, qkv_out_, tc * width());
    qkv_.forward(x, qkv);  // [tc, ng·(q/g+2)·d]
    if (cfg_.add_qkv_bias) ops::add_row_bias(exec_, View<T const, Space>(qkv_bias_.value), qkv);
    // Positions of the queries (this CP rank's) and of the gathered keys; RoPE tables.
    auto const qpos = shard_.cp_positions(), kpos = gathered_positions(shard_);
    copy(exec_, View<std::int64_t const>(qpos), detail::reuse(exec_, q_pos_, sc));
    copy(exec_, View<std::int64_t const>(kpos), detail::reuse(exec_, k_pos_, s));
    rope_.assign(exec_, q_pos_.view(), d, cfg_.rope_base);
    // Split into q [tc, nq·d] and k, v [tc, ng·d]; rotate q and k.
    auto const q = detail::reuse(exec_, q_, tc * nq * d);
    auto const kl = detail::reuse(exec_, k_local_, tc * ng * d);
    auto const vl = detail::reuse(exec_, v_local_, tc * ng * d);
    ops::rotate_heads(exec_, qkv, q_layout(), q, ops::HeadLayout::packed(nq, d), tc, nq, batch,
                      rope_.cos(), rope_.sin(), 1.0);
    ops::rotate_heads(exec_, qkv, kv_layout(0), kl, ops::HeadLayout::packed(ng, d), tc, ng, batch,
                      rope_.cos(), rope_.sin(), 1.0);
    ops::rotate_heads(exec_, qkv, kv_layout(1), vl, ops::HeadLayout::packed(ng, d), tc, ng, batch,
                      rope_.cos(), rope_.sin(), 0.0);
    cp_all_gather<T>(*cp_, kl, detail::reuse(exec_, k_, s * batch * ng * d));  // [s·batch, ng·d]
    cp_all_gather<T>(*cp_, vl, detail::reuse(exec_, v_, s * batch * ng * d));

    // Per (sequence, head): o = softmax(mask(q·kᵀ/√d))·v, tiled with an online softmax; only
    // the row logsumexp is kept for backward (ops/flash_attention.hpp).
    auto const ctx = detail::reuse(exec_, ctx_, tc * nq * d);
    auto const lse = detail::reuse(exec_, lse_, batch * nq * sc);
    ops::flash_attention_forward(exec_, flash_shape(batch), scale(), View<T const, Space>(q),
                                 View<T const, Space>(k_), View<T const, Space>(v_), q_pos_.view(),
                                 k_pos_.view(), ctx, lse);
    batch_ = batch;
    proj_.forward(ctx, y);
  }
  Buffer<T, Space> forward(View<T const, Space> x, std::int64_t batch) {
    return detail::allocated<T>(exec_, x.size(), [&](View<T, Space> y) { forward(x, batch, y); });
  }

  /// dy [S/(CP·TP), B, H] → dx, same shape; accumulates the weight gradients.
  /// Collective over `tp` and `cp`.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    std::int64_t const d = cfg_.head_dim, nq = local_heads(), ng = local_groups();
    std::int64_t const batch = batch_, sc = shard_.cp_seq(), tc = sc * batch;
    auto const dctx = detail::reuse(exec_, dctx_, tc * nq * d);
    proj_.backward(dy, dctx);  // [tc, nq·d]
    auto const dq = detail::reuse(exec_, dq_, static_cast<std::int64_t>(q_.size()));
    auto const dk = detail::reuse(exec_, dk_, static_cast<std::int64_t>(k_.size()));
    auto const dv = detail::reuse(exec_, dv_, static_cast<std::int64_t>(v_.size()));
    // dS = P ⊙ (dO·vᵀ − rowsum(dO ⊙ O)) with P recomputed tile by tile from the logsumexp;
    // dq = dS·k/√d, dk = dSᵀ·q/√d, dv = Pᵀ·dO (summed over a group's query heads).
    ops::flash_attention_backward(exec_, flash_shape(batch), scale(), View<T const, Space>(q_),
                                  View<T const, Space>(k_), View<T const, Space>(v_),
                                  View<T const, Space>(ctx_), View<C const, Space>(lse_),
                                  View<T const, Space>(dctx), q_pos_.view(), k_pos_.view(),
                                  detail::reuse(exec_, delta_, batch * nq * sc), dq, dk, dv);
    auto const dkl = detail::reuse(exec_, dk_local_, tc * ng * d);
    auto const dvl = detail::reuse(exec_, dv_local_, tc * ng * d);
    cp_reduce_scatter<T>(*cp_, dk, dkl);
    cp_reduce_scatter<T>(*cp_, dv, dvl);

    auto const dqkv = detail::reuse(exec_, dqkv_, tc * width());
    ops::rotate_heads(exec_, dq_, ops::HeadLayout::packed(nq, d), dqkv, q_layout(), tc, nq, batch,
                      rope_.cos(), rope_.sin(), -1.0);
    ops::rotate_heads(exec_, dkl, ops::HeadLayout::packed(ng, d), dqkv, kv_layout(0), tc, ng, batch,
                      rope_.cos(), rope_.sin(), -1.0);
    ops::rotate_heads(exec_, dvl, ops::HeadLayout::packed(ng, d), dqkv, kv_layout(1), tc, ng, batch,
                      rope_.cos(), rope_.sin(), 0.0);
    if (cfg_.add_qkv_bias)
      ops::bias_gradient(exec_, View<T const, Space>(dqkv), View<grad_t<T>, Space>(qkv_bias_.grad));
    qkv_.backward(dqkv, dx);
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, dy.size(), [&](View<T, Space> dx) { backward(dy, dx); });
  }

  ColumnParallelLinear<Exec, T, Comm>& linear_qkv() noexcept { return qkv_; }
  RowParallelLinear<Exec, T, Comm>& linear_proj() noexcept { return proj_; }
  /// The QKV bias (with `add_qkv_bias`; otherwise an empty parameter).
  Param<T, Space>& linear_qkv_bias() noexcept { return qkv_bias_; }
  ParamList<T> parameters() {
    if (cfg_.add_qkv_bias) return {&qkv_.weight(), &qkv_bias_, &proj_.weight()};
    return {&qkv_.weight(), &proj_.weight()};
  }

  /// Per-microbatch saved tensors (nn/microbatch_stash.hpp).
  void stash(int mb) {
    stash_.stash(mb, saved());
    qkv_.stash(mb);
    proj_.stash(mb);
  }
  void restore(int mb) {
    stash_.restore(mb, saved());
    qkv_.restore(mb);
    proj_.restore(mb);
  }
  void drop_stashed() {
    stash_.drop();
    qkv_.drop_stashed();
    proj_.drop_stashed();
  }

 private:
  static AttentionConfig normalized(AttentionConfig c, int tp) {
    std::string const layer = "Attention '" + c.name + "'";
    if (c.kv_groups == 0) c.kv_groups = c.heads;
    MOEFOLD_EXPECTS(c.hidden > 0 && c.heads > 0 && c.kv_groups > 0,
                    "{}: hidden {}, heads {}, kv_groups {} must be positive", layer, c.hidden,
                    c.heads, c.kv_groups);
    if (c.head_dim == 0) {
      detail::require_divisible(c.hidden, c.heads, layer, "hidden size", "num_attention_heads");
      c.head_dim = c.hidden / c.heads;
    }
    detail::require_divisible(c.heads, tp, layer, "num_attention_heads", "TP");
    detail::require_divisible(c.kv_groups, tp, layer, "num_query_groups", "TP");
    detail::require_divisible(c.heads, c.kv_groups, layer, "num_attention_heads",
                              "num_query_groups");
    if (c.head_dim % 2 != 0)
      throw invalid_config(fmt::format("{}: head dimension {} must be even for rotary embeddings",
                                       layer, c.head_dim));
    return c;
  }
  std::int64_t q_per_group() const noexcept { return cfg_.heads / cfg_.kv_groups; }
  /// Width of a local qkv row (Megatron's group-interleaved layout).
  std::int64_t width() const noexcept {
    return local_groups() * (q_per_group() + 2) * cfg_.head_dim;
  }
  ops::FlashShape flash_shape(std::int64_t batch) const noexcept {
    return {.batch = batch,
            .heads = local_heads(),
            .groups = local_groups(),
            .sq = shard_.cp_seq(),
            .sk = shard_.seq,
            .dim = cfg_.head_dim};
  }
  C scale() const noexcept { return static_cast<C>(1.0 / std::sqrt(double(cfg_.head_dim))); }
  /// Queries, keys (which = 0) or values (which = 1) in a local qkv row.
  ops::HeadLayout q_layout() const noexcept {
    return {width(), q_per_group(), q_per_group() + 2, 0, cfg_.head_dim};
  }
  ops::HeadLayout kv_layout(std::int64_t which) const noexcept {
    return {width(), 1, q_per_group() + 2, q_per_group() + which, cfg_.head_dim};
  }
  /// What backward reads of the forward (the RoPE tables depend on the shard only).
  auto saved() { return std::tie(shard_, batch_, q_pos_, k_pos_, q_, k_, v_, ctx_, lse_); }

  Exec exec_;
  AttentionConfig cfg_;
  Comm* tp_;
  Comm* cp_;
  ColumnParallelLinear<Exec, T, Comm> qkv_;
  RowParallelLinear<Exec, T, Comm> proj_;
  Param<T, Space> qkv_bias_;  ///< with add_qkv_bias: this TP rank's columns of the QKV bias
  SequenceShard shard_;
  std::int64_t batch_ = 0;
  RotaryTable<Exec> rope_;
  Buffer<std::int64_t, Space> q_pos_, k_pos_;
  // Saved for backward: rotated queries, gathered keys and values, the attention output and
  // its row logsumexp [B·heads, S/CP] in the compute type (no S×S probabilities).
  Buffer<T, Space> q_, k_, v_, ctx_;
  Buffer<C, Space> lse_;
  // Per-step temporaries, reused across calls; the core sums dq, dk (over a group's heads) and
  // dv in the compute type and rounds each once.
  Buffer<T, Space> qkv_out_, k_local_, v_local_, dctx_, dq_, dk_, dv_, dk_local_, dv_local_, dqkv_;
  Buffer<C, Space> delta_;  ///< rowsum(dO ∘ O) [B·heads, S/CP]
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using Attention = moefold::Attention<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
