#pragma once
/// \file
/// `Attention`: causal self-attention with grouped-query heads, rotary embeddings, tensor
/// parallelism with SP over `tp` and context parallelism over `cp`.
///
///   x [T, H] SP-local ──ColumnParallelLinear (AG tp)──▶ qkv [T·TP, (local groups)·(q/g + 2)·d]
///     → RoPE on q, k at the tokens' global positions
///     → all-gather k, v over cp (context_parallel.hpp) → causal softmax(q·kᵀ/√d)·v per head
///     ──RowParallelLinear (RS tp)──▶ y [T, H] SP-local
///
/// QKV weight `[G·(N/G + 2)·d, H]` in Megatron's layout: for each query group, its N/G query
/// heads, then its key head, then its value head. Splitting the rows over TP gives each rank
/// G/TP whole groups (N/TP query heads). The projection weight is `[H, N·d]`, split by columns.
/// Backward: reduce-scatter of the key/value gradients over cp, then the linear layers'
/// reverse collectives over tp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/context_parallel.hpp"
#include "moefold/nn/rotary.hpp"
#include "moefold/nn/row_parallel_linear.hpp"
#include "moefold/nn/sequence_shard.hpp"

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
  std::uint64_t seed = 0;
  double init_scale = 0.02;  ///< init_method_std
};

/// Causal GQA self-attention with RoPE, TP (+SP) over `tp` and CP over `cp`.
template <class T, Communicator Comm>
class Attention {
 public:
  /// Throws `invalid_config` when heads or groups are not divisible by TP, heads not by groups,
  /// or the head dimension is odd.
  Attention(AttentionConfig cfg, Comm& tp, Comm& cp)
      : cfg_(normalized(std::move(cfg), tp.size())),
        tp_(&tp),
        cp_(&cp),
        qkv_(LinearConfig{.name = cfg_.name + ".linear_qkv.weight",
                          .in = cfg_.hidden,
                          .out = cfg_.kv_groups * (q_per_group() + 2) * cfg_.head_dim,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp),
        proj_(LinearConfig{.name = cfg_.name + ".linear_proj.weight",
                           .in = cfg_.heads * cfg_.head_dim,
                           .out = cfg_.hidden,
                           .seed = cfg_.seed,
                           .scale = cfg_.init_scale},
              tp) {}

  AttentionConfig const& config() const noexcept { return cfg_; }
  std::int64_t local_heads() const noexcept { return cfg_.heads / tp_->size(); }
  std::int64_t local_groups() const noexcept { return cfg_.kv_groups / tp_->size(); }

  /// x: this rank's tokens [S/(CP·TP), B, H] (SequenceShard layout) → y, same shape. `batch` is
  /// B. Throws `invalid_config` when the implied sequence S is not divisible by 2·CP·TP.
  /// Collective over `tp` and `cp`.
  std::vector<T> forward(std::span<T const> x, std::int64_t batch) {
    std::int64_t const d = cfg_.head_dim, nq = local_heads(), ng = local_groups();
    std::int64_t const rows = detail::rows_of(x.size(), cfg_.hidden, "Attention " + cfg_.name);
    MOEFOLD_EXPECTS(batch > 0 && rows % batch == 0,
                    "Attention {}: {} tokens are not whole rows of batch {}", cfg_.name, rows,
                    batch);
    shard_ = SequenceShard{.seq = rows / batch * tp_->size() * cp_->size(),
                           .batch = batch,
                           .tp = tp_->size(),
                           .tp_rank = tp_->rank(),
                           .cp = cp_->size(),
                           .cp_rank = cp_->rank()};
    shard_.validate();
    std::int64_t const sc = shard_.cp_seq(), s = shard_.seq, tc = sc * batch;

    auto const qkv = qkv_.forward(x);  // [tc, ng·(q/g+2)·d]
    // Split into q [tc, nq·d] and k, v [tc, ng·d]; rotate q and k.
    RotaryTable const rope(shard_.cp_positions(), d, cfg_.rope_base);
    q_.assign(static_cast<std::size_t>(tc * nq * d), T{});
    std::vector<T> k(static_cast<std::size_t>(tc * ng * d)), v(k.size());
    for (std::int64_t r = 0; r < tc; ++r) {
      auto const pos = static_cast<std::size_t>(r / batch);
      for (std::int64_t h = 0; h < nq; ++h) {
        T* dst = q_.data() + (r * nq + h) * d;
        std::copy_n(qkv.data() + r * width() + q_offset(h), d, dst);
        rope.rotate(dst, pos);
      }
      for (std::int64_t g = 0; g < ng; ++g) {
        T* kd = k.data() + (r * ng + g) * d;
        std::copy_n(qkv.data() + r * width() + k_offset(g), d, kd);
        rope.rotate(kd, pos);
        std::copy_n(qkv.data() + r * width() + k_offset(g) + d, d, v.data() + (r * ng + g) * d);
      }
    }
    k_ = cp_all_gather<T>(*cp_, detail::cspan(k));  // [s·batch, ng·d]
    v_ = cp_all_gather<T>(*cp_, detail::cspan(v));
    q_pos_ = shard_.cp_positions();
    k_pos_ = gathered_positions(shard_);

    // Per (sequence, head): P = softmax(mask(q·kᵀ/√d)), o = P·v, strided GEMMs over [s, b].
    probs_.assign(static_cast<std::size_t>(batch * nq * sc * s), T{});
    std::vector<T> ctx(static_cast<std::size_t>(tc * nq * d));
    T const scale = static_cast<T>(1.0 / std::sqrt(double(d)));
    std::int64_t const ldq = batch * nq * d, ldk = batch * ng * d;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < nq; ++h) {
        std::int64_t const g = h / q_per_group();
        T* p = probs_.data() + (b * nq + h) * sc * s;
        gemm<T>(Trans::no, Trans::yes, sc, s, d, scale, q_.data() + (b * nq + h) * d, ldq,
                k_.data() + (b * ng + g) * d, ldk, T{0}, p, s);
        for (std::int64_t i = 0; i < sc; ++i)
          causal_softmax(p + i * s, q_pos_[static_cast<std::size_t>(i)]);
        gemm<T>(Trans::no, Trans::no, sc, d, s, T{1}, p, s, v_.data() + (b * ng + g) * d, ldk, T{0},
                ctx.data() + (b * nq + h) * d, ldq);
      }
    batch_ = batch;
    return proj_.forward(detail::cspan(ctx));
  }

  /// dy [S/(CP·TP), B, H] → dx, same shape; accumulates the weight gradients.
  /// Collective over `tp` and `cp`.
  std::vector<T> backward(std::span<T const> dy) {
    std::int64_t const d = cfg_.head_dim, nq = local_heads(), ng = local_groups();
    std::int64_t const batch = batch_, sc = shard_.cp_seq(), s = shard_.seq, tc = sc * batch;
    auto const dctx = proj_.backward(dy);  // [tc, nq·d]
    std::vector<T> dq(q_.size()), dk(k_.size()), dv(v_.size());
    std::vector<T> dp(static_cast<std::size_t>(sc * s));
    T const scale = static_cast<T>(1.0 / std::sqrt(double(d)));
    std::int64_t const ldq = batch * nq * d, ldk = batch * ng * d;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t h = 0; h < nq; ++h) {
        std::int64_t const g = h / q_per_group();
        T const* p = probs_.data() + (b * nq + h) * sc * s;
        T const* dout = dctx.data() + (b * nq + h) * d;
        T const* kp = k_.data() + (b * ng + g) * d;
        T const* vp = v_.data() + (b * ng + g) * d;
        // dV += Pᵀ·dO;  dP = dO·Vᵀ;  dS = P ⊙ (dP − rowsum(P ⊙ dP)) / √d
        gemm<T>(Trans::yes, Trans::no, s, d, sc, T{1}, p, s, dout, ldq, T{1},
                dv.data() + (b * ng + g) * d, ldk);
        gemm<T>(Trans::no, Trans::yes, sc, s, d, T{1}, dout, ldq, vp, ldk, T{0}, dp.data(), s);
        for (std::int64_t i = 0; i < sc; ++i) {
          T const* pr = p + i * s;
          T* dr = dp.data() + i * s;
          T dot{0};
          for (std::int64_t j = 0; j < s; ++j) dot += pr[j] * dr[j];
          for (std::int64_t j = 0; j < s; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
        }
        // dQ = dS·K;  dK += dSᵀ·Q
        gemm<T>(Trans::no, Trans::no, sc, d, s, T{1}, dp.data(), s, kp, ldk, T{0},
                dq.data() + (b * nq + h) * d, ldq);
        gemm<T>(Trans::yes, Trans::no, s, d, sc, T{1}, dp.data(), s, q_.data() + (b * nq + h) * d,
                ldq, T{1}, dk.data() + (b * ng + g) * d, ldk);
      }
    auto dk_local = cp_reduce_scatter<T>(*cp_, detail::cspan(dk));
    auto dv_local = cp_reduce_scatter<T>(*cp_, detail::cspan(dv));

    RotaryTable const rope(shard_.cp_positions(), d, cfg_.rope_base);
    std::vector<T> dqkv(static_cast<std::size_t>(tc * width()));
    for (std::int64_t r = 0; r < tc; ++r) {
      auto const pos = static_cast<std::size_t>(r / batch);
      T* row = dqkv.data() + r * width();
      for (std::int64_t h = 0; h < nq; ++h) {
        std::copy_n(dq.data() + (r * nq + h) * d, d, row + q_offset(h));
        rope.rotate(row + q_offset(h), pos, /*inverse=*/true);
      }
      for (std::int64_t g = 0; g < ng; ++g) {
        std::copy_n(dk_local.data() + (r * ng + g) * d, d, row + k_offset(g));
        rope.rotate(row + k_offset(g), pos, /*inverse=*/true);
        std::copy_n(dv_local.data() + (r * ng + g) * d, d, row + k_offset(g) + d);
      }
    }
    return qkv_.backward(detail::cspan(dqkv));
  }

  ColumnParallelLinear<T, Comm>& linear_qkv() noexcept { return qkv_; }
  RowParallelLinear<T, Comm>& linear_proj() noexcept { return proj_; }
  ParamList<T> parameters() { return {&qkv_.weight(), &proj_.weight()}; }

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
  /// Width of a local qkv row and offsets in it (Megatron's group-interleaved layout).
  std::int64_t width() const noexcept {
    return local_groups() * (q_per_group() + 2) * cfg_.head_dim;
  }
  std::int64_t q_offset(std::int64_t h) const noexcept {
    return ((h / q_per_group()) * (q_per_group() + 2) + h % q_per_group()) * cfg_.head_dim;
  }
  std::int64_t k_offset(std::int64_t g) const noexcept {
    return (g * (q_per_group() + 2) + q_per_group()) * cfg_.head_dim;
  }
  /// Softmax of one score row over the keys at or before `qpos`; masked entries become 0.
  void causal_softmax(T* row, std::int64_t qpos) const {
    std::int64_t const s = shard_.seq;
    T mx = -std::numeric_limits<T>::infinity();
    for (std::int64_t j = 0; j < s; ++j)
      if (k_pos_[static_cast<std::size_t>(j)] <= qpos) mx = std::max(mx, row[j]);
    T sum{0};
    for (std::int64_t j = 0; j < s; ++j) {
      row[j] = k_pos_[static_cast<std::size_t>(j)] <= qpos ? std::exp(row[j] - mx) : T{0};
      sum += row[j];
    }
    for (std::int64_t j = 0; j < s; ++j) row[j] /= sum;
  }

  AttentionConfig cfg_;
  Comm* tp_;
  Comm* cp_;
  ColumnParallelLinear<T, Comm> qkv_;
  RowParallelLinear<T, Comm> proj_;
  SequenceShard shard_;
  std::int64_t batch_ = 0;
  std::vector<T> q_, k_, v_, probs_;
  std::vector<std::int64_t> q_pos_, k_pos_;
};

}  // namespace v0
}  // namespace moefold
