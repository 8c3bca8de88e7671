#pragma once
/// \file
/// The distributed optimizer (Megatron's `--use-distributed-optimizer`): AdamW whose state is
/// sharded over the data-parallel replicas.
///
/// * **Buffers and buckets, in Megatron's order.** The parameters are laid out in reverse order
///   (the order their gradients become ready in the backward), one buffer per kind: non-expert
///   (dense and TP-replicated) and expert. Each parameter starts on a multiple of 64 elements;
///   a bucket closes once it holds `bucket_size` elements (none given: one bucket per buffer,
///   Megatron's choice without overlapped reduction) and its end is padded to a multiple of
///   lcm(shards, 128). Rank r of the shard group owns elements [r·s, (r+1)·s) of each bucket,
///   s = bucket size / shards.
/// * **Reduction.** Gradients are pre-scaled (1/(DP·CP), as `reduce_gradients`), TP-replicated
///   ones summed over `tp` first (a sum, so it commutes with the data-parallel one), then each
///   bucket is reduce-scattered over the shard group — `dp_cp` for non-expert buckets, `edp` for
///   expert ones; with `num_distributed_optimizer_instances` N > 1 the intra-partial groups, and
///   each shard is then all-reduced over `inter_partial_edp`, Megatron's shared inter-instance
///   group. The parameters' own gradient buffers are left as they were.
/// * **Norm.** Σ g² over this rank's shard (TP-replicated elements on TP rank 0 only), summed
///   over the shard group and then over `mp` (non-expert) or `tp_ep_pp` (expert): every element
///   is counted once.
/// * **Step.** AdamW (`ops::AdamWUpdate`) on the shard only — the moments exist for the shard's
///   elements only (no padding) — then each bucket's updated shards are all-gathered over the
///   shard group into every replica's parameters.
/// * **BF16** (Megatron's `--bf16`): gradients are FP32 main gradients (`grad_t<T>`), scaled,
///   reduce-scattered and clipped in FP32; the optimizer keeps FP32 main parameters for its
///   shard (sharded like the moments), steps them and all-gathers the values rounded to bf16.
///
///   DistributedOptimizer opt(exec, params, groups, {.weight_decay = 0.1});
///   finalize_model_grads(stage, groups, opt);   // reduce-scatter instead of all-reduce
///   opt.clip_grad_norm(1.0);
///   opt.step(lr);

#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <span>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/param.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/adamw.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/gradients.hpp"
#include "moefold/train/adamw.hpp"
#include "moefold/train/gradient_reduction.hpp"

namespace moefold {
inline namespace v0 {

/// Choices of the distributed optimizer besides AdamW's.
struct DistributedOptimizerOptions {
  /// Megatron's `--ddp-bucket-size` (elements); none: one bucket per buffer.
  std::optional<std::int64_t> bucket_size = std::nullopt;
};

/// The global blocks of local elements [offset, offset + size) of a parameter shard whose
/// storage is `blocks` (each row-major, concatenated): whole rows as one block, a cut row as a
/// 1-row block.
inline std::vector<ParamBlock> blocks_of_range(std::vector<ParamBlock> const& blocks,
                                               std::int64_t offset, std::int64_t size) {
  std::vector<ParamBlock> out;
  std::int64_t at = 0;  // local index of the current block's first element
  std::int64_t const end = offset + size;
  for (auto const& b : blocks) {
    std::int64_t lo = std::max(offset, at) - at, hi = std::min(end, at + b.size()) - at;
    at += b.size();
    if (lo >= hi || b.cols == 0) continue;
    auto row_piece = [&](std::int64_t r, std::int64_t c0, std::int64_t c1) {
      out.push_back({.row0 = b.row0 + r, .rows = 1, .col0 = b.col0 + c0, .cols = c1 - c0});
    };
    if (lo % b.cols != 0) {  // head: the rest of a cut row
      std::int64_t const r = lo / b.cols, c1 = std::min(b.cols, hi - r * b.cols);
      row_piece(r, lo % b.cols, c1);
      lo = r * b.cols + c1;
    }
    if (hi - lo >= b.cols) {  // whole rows
      std::int64_t const rows = (hi - lo) / b.cols;
      out.push_back({.row0 = b.row0 + lo / b.cols, .rows = rows, .col0 = b.col0, .cols = b.cols});
      lo += rows * b.cols;
    }
    if (lo < hi) row_piece(lo / b.cols, 0, hi - lo);  // tail: the start of a cut row
  }
  return out;
}

template <ExecutionInstance Exec, class T, Communicator C>
class DistributedOptimizer {
 public:
  using memory_space = typename Exec::memory_space;
  using Moments = Buffer<adam_moment_t<T>, memory_space>;
  using G = grad_t<T>;  ///< gradients: FP32 main gradients for a bf16 model
  /// FP32 main parameters of a bf16 model, sharded like the moments.
  using MainParams = Buffer<compute_t<T>, memory_space>;

  /// The part of parameter `param` in this rank's shard of a bucket.
  struct Segment {
    std::size_t param = 0;           ///< index into params()
    std::int64_t param_offset = 0;   ///< first local element of the parameter
    std::int64_t shard_offset = 0;   ///< where it sits in the bucket's shard
    std::int64_t state_offset = 0;   ///< where its moments sit (optimizer state has no padding)
    std::int64_t size = 0;
  };
  /// A bucket of one buffer: its parameters, where they start, its padded size, and this
  /// rank's shard (gradient and moments).
  struct Bucket {
    bool expert = false;
    std::vector<std::size_t> params;
    std::vector<std::int64_t> starts;  ///< bucket-relative
    std::int64_t size = 0;             ///< padded
    std::int64_t shard_size = 0;
    std::int64_t shard_start = 0;
    std::vector<Segment> segments;
    Buffer<G, memory_space> grad;  ///< the reduced gradient of this rank's shard
    Moments exp_avg, exp_avg_sq;
    MainParams main;  ///< this rank's FP32 main parameters (bf16 models; empty otherwise)
  };

  /// Shards the state of `params` (which must list the same parameters in the same order on
  /// every rank of each group) over the data-parallel groups of `groups`.
  DistributedOptimizer(Exec exec, ParamList<T> params, ProcessGroups<C>& groups,
                       AdamWConfig config = {}, DistributedOptimizerOptions options = {})
      : exec_(std::move(exec)), params_(std::move(params)), groups_(&groups), cfg_(config) {
    MOEFOLD_EXPECTS(!options.bucket_size || *options.bucket_size > 0,
                    "distributed optimizer: bucket_size {} must be positive",
                    options.bucket_size.value_or(0));
    instances_ = groups.mapping().num_distributed_optimizer_instances();
    tp_first_ = groups.tp().rank() == 0;
    first_instance_ = instances_ == 1 || groups.get(Group::inter_partial_edp).rank() == 0;
    for (bool expert : {false, true}) build_buckets(expert, options.bucket_size);
  }

  /// Reduce-scatters every bucket (see the file comment), each gradient first multiplied by
  /// `pre_scale`. Collective over the shard groups, `tp` and, with N > 1, `inter_partial_edp`.
  void reduce_gradients(G pre_scale) {
    if (pre_scale != G(1))
      for (auto* p : params_) ops::scale(exec_, pre_scale, View<G, memory_space>(p->grad));
    detail::reduce_bucket(exec_, params_, ParamClass::tp_replicated, [&](std::span<G> b) {
      groups_->tp().all_reduce(b, ReduceOp::sum);
    });
    for (auto& b : buckets_) {
      auto full = exec_.template allocate<G>(b.size);
      ops::fill(exec_, full.view(), G{});
      for (std::size_t i = 0; i < b.params.size(); ++i) {
        auto const& g = params_[b.params[i]]->grad;
        auto const n = static_cast<std::int64_t>(g.size());
        copy(exec_, View<G const, memory_space>(g), full.view().cols(b.starts[i], n));
      }
      exec_.fence();
      shard_group(b.expert).reduce_scatter(std::span<G const>(full.view()),
                                           std::span<G>(b.grad.view()), ReduceOp::sum);
      if (instances_ > 1)
        groups_->get(Group::inter_partial_edp)
            .all_reduce(std::span<G>(b.grad.view()), ReduceOp::sum);
    }
  }
  /// `reduce_gradients` with Megatron's default pre-scale 1/(DP·CP).
  void reduce_gradients() {
    auto const& f = groups_->mapping();
    reduce_gradients(G(1) / static_cast<G>(f.dp() * f.cp()));
  }
  /// Multiplies the reduced shards by `a` (the per-token-loss division).
  void scale_gradients(G a) {
    for (auto& b : buckets_) ops::scale(exec_, a, b.grad.view());
  }

  /// The L2 norm of the reduced gradients, each element counted once; the same on every rank.
  /// Collective over the shard groups, `mp` and `tp_ep_pp`.
  double grad_norm() {
    std::vector<double> dense{0.0}, expert{0.0};
    for (auto& b : buckets_) {
      auto sums = exec_.template allocate<double>(
          static_cast<std::int64_t>(std::max<std::size_t>(b.segments.size(), 1)));
      for (std::size_t k = 0; k < b.segments.size(); ++k)
        ops::sum_of_squares(exec_, shard_grad(b, b.segments[k]),
                            sums.view().cols(static_cast<std::int64_t>(k), 1));
      Buffer<double> host(sums.size());
      copy(exec_, View<double const, memory_space>(sums.view()), host.view());
      exec_.fence();
      for (std::size_t k = 0; k < b.segments.size(); ++k) {
        bool const counted =
            params_[b.segments[k].param]->cls != ParamClass::tp_replicated || tp_first_;
        (b.expert ? expert : dense)[0] += counted ? host[k] : 0.0;
      }
    }
    shard_group(false).all_reduce(std::span<double>(dense));
    shard_group(true).all_reduce(std::span<double>(expert));
    groups_->mp().all_reduce(std::span<double>(dense));
    groups_->tp_ep_pp().all_reduce(std::span<double>(expert));
    return std::sqrt(dense[0] + expert[0]);
  }

  /// Scales the reduced shards by min(1, max_norm / (norm + 1e-6)) (Megatron's clip_grad_norm)
  /// and returns the norm before clipping. Collective like `grad_norm`.
  double clip_grad_norm(double max_norm) {
    double const norm = grad_norm();
    double const coeff = max_norm / (norm + 1e-6);
    if (coeff < 1.0)
      for (auto& b : buckets_) ops::scale_in_double(exec_, coeff, b.grad.view());
    return norm;
  }

  /// AdamW on this rank's shard with learning rate `lr`, then the updated parameters
  /// all-gathered over the shard groups. Collective over the shard groups.
  void step(double lr) {
    ++steps_;
    for (auto& b : buckets_) {
      auto shard = exec_.template allocate<T>(b.shard_size);
      ops::fill(exec_, shard.view(), T{});
      for (auto const& s : b.segments) {
        Param<T>& p = *params_[s.param];
        auto value = View<T, memory_space>(p.value).cols(s.param_offset, s.size);
        auto const st = adamw_step(cfg_, lr, steps_, p.global_rows > 1);
        auto m = b.exp_avg.view().cols(s.state_offset, s.size);
        auto v = b.exp_avg_sq.view().cols(s.state_offset, s.size);
        if constexpr (has_main_params_v<T>) {  // step the FP32 main shard, round to the value
          auto main = b.main.view().cols(s.state_offset, s.size);
          ops::adamw_update(exec_, st, main, shard_grad(b, s), m, v);
          ops::convert<Exec, compute_t<T>, T>(exec_, main, value);
        } else {
          ops::adamw_update(exec_, st, value, shard_grad(b, s), m, v);
        }
        copy(exec_, View<T const, memory_space>(value), shard.view().cols(s.shard_offset, s.size));
      }
      auto full = exec_.template allocate<T>(b.size);
      exec_.fence();
      shard_group(b.expert).all_gather(std::span<T const>(shard.view()),
                                       std::span<T>(full.view()));
      for (std::size_t i = 0; i < b.params.size(); ++i) {
        auto& v = params_[b.params[i]]->value;
        copy(exec_, View<T const, memory_space>(full.view().cols(b.starts[i], v.size())),
             View<T, memory_space>(v));
      }
    }
    exec_.fence();
  }

  Exec const& exec() const noexcept { return exec_; }
  std::int64_t steps() const noexcept { return steps_; }
  void set_steps(std::int64_t s) noexcept { steps_ = s; }
  ParamList<T> const& params() const noexcept { return params_; }
  std::vector<Bucket>& buckets() noexcept { return buckets_; }
  std::vector<Bucket> const& buckets() const noexcept { return buckets_; }
  /// Whether this rank saves the moments of segment `s` in a checkpoint: one optimizer
  /// instance, and TP-replicated parameters from TP rank 0 only.
  bool saves(Segment const& s) const {
    return first_instance_ && (params_[s.param]->cls != ParamClass::tp_replicated || tp_first_);
  }
  /// Sets this rank's main-parameter shards from the (bf16) values, e.g. after loading weights
  /// without optimizer state; nothing for a model without main parameters.
  void reload_main_params() {
    if constexpr (has_main_params_v<T>)
      for (auto& b : buckets_)
        for (auto const& s : b.segments)
          ops::convert<Exec, T, compute_t<T>>(
              exec_,
              View<T const, memory_space>(params_[s.param]->value).cols(s.param_offset, s.size),
              b.main.view().cols(s.state_offset, s.size));
  }

  /// Bytes of optimizer state this rank holds (both moments of its shards and, for a bf16
  /// model, the FP32 main parameters of its shards), counted from the buffers.
  std::int64_t state_bytes() const {
    std::int64_t n = 0;
    for (auto const& b : buckets_)
      n += static_cast<std::int64_t>((b.exp_avg.size() + b.exp_avg_sq.size()) *
                                         sizeof(typename Moments::value_type) +
                                     b.main.size() * sizeof(typename MainParams::value_type));
    return n;
  }
  /// Bytes of the reduced gradient shards this rank holds (besides the parameters' gradients).
  std::int64_t shard_grad_bytes() const {
    std::int64_t n = 0;
    for (auto const& b : buckets_) n += static_cast<std::int64_t>(b.grad.size() * sizeof(G));
    return n;
  }

 private:
  C& shard_group(bool expert) {
    if (instances_ == 1) return expert ? groups_->edp() : groups_->dp_cp();
    return groups_->get(expert ? Group::intra_partial_edp : Group::intra_partial_dp_cp);
  }

  View<G const, memory_space> shard_grad(Bucket& b, Segment const& s) {
    return View<G const, memory_space>(b.grad.view().cols(s.shard_offset, s.size));
  }

  void build_buckets(bool expert, std::optional<std::int64_t> bucket_size) {
    auto const shards = static_cast<std::int64_t>(shard_group(expert).size());
    auto const rank = static_cast<std::int64_t>(shard_group(expert).rank());
    std::int64_t const divisor = std::lcm(shards, std::int64_t{128});
    auto pad = [](std::int64_t n, std::int64_t d) { return (n + d - 1) / d * d; };
    Bucket cur;
    auto close = [&] {
      if (cur.params.empty()) return;
      cur.expert = expert;
      cur.size = pad(cur.size, divisor);
      cur.shard_size = cur.size / shards;
      cur.shard_start = rank * cur.shard_size;
      std::int64_t state = 0;
      for (std::size_t i = 0; i < cur.params.size(); ++i) {
        auto const n = static_cast<std::int64_t>(params_[cur.params[i]]->size());
        std::int64_t const lo = std::max(cur.starts[i], cur.shard_start);
        std::int64_t const hi = std::min(cur.starts[i] + n, cur.shard_start + cur.shard_size);
        if (lo >= hi) continue;
        cur.segments.push_back({.param = cur.params[i],
                                .param_offset = lo - cur.starts[i],
                                .shard_offset = lo - cur.shard_start,
                                .state_offset = state,
                                .size = hi - lo});
        state += hi - lo;
      }
      cur.grad = exec_.template allocate<G>(cur.shard_size);
      if constexpr (has_main_params_v<T>) cur.main = exec_.template allocate<compute_t<T>>(state);
      cur.exp_avg = exec_.template allocate<adam_moment_t<T>>(state);
      cur.exp_avg_sq = exec_.template allocate<adam_moment_t<T>>(state);
      ops::fill(exec_, cur.exp_avg.view(), adam_moment_t<T>{});
      ops::fill(exec_, cur.exp_avg_sq.view(), adam_moment_t<T>{});
      buckets_.push_back(std::move(cur));
      cur = Bucket{};
    };
    for (std::size_t k = params_.size(); k-- > 0;) {
      if ((params_[k]->cls == ParamClass::expert) != expert) continue;
      std::int64_t const start = pad(cur.size, 64);
      cur.params.push_back(k);
      cur.starts.push_back(start);
      cur.size = start + static_cast<std::int64_t>(params_[k]->size());
      if (bucket_size && cur.size >= *bucket_size) close();
    }
    close();
    reload_main_params();
    exec_.fence();
  }

  Exec exec_;
  ParamList<T> params_;
  ProcessGroups<C>* groups_;
  AdamWConfig cfg_;
  int instances_ = 1;
  bool tp_first_ = true;
  bool first_instance_ = true;
  std::int64_t steps_ = 0;
  std::vector<Bucket> buckets_;
};

}  // namespace v0
}  // namespace moefold
