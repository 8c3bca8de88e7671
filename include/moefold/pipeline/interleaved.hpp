#pragma once
/// \file
/// `Interleaved`: Megatron's interleaved 1F1B schedule (spec §3.2) as data. Each PP rank holds
/// N = `virtual_stages` model chunks; chunk c on rank p is virtual stage c·PP + p.
///
///   schedule table (Gm = group size): for each group of Gm microbatches, every chunk in turn
///   PP=4, N=2, M=8, Gm=4:  0c0 1c0 2c0 3c0 0c1 1c1 2c1 3c1 4c0 5c0 6c0 7c0 4c1 5c1 6c1 7c1
///
///   rank 0, W = 2·(PP−1) + (N−1)·Gm = 10:
///   F0c0 F1c0 F2c0 F3c0 F0c1 F1c1 F2c1 F3c1 F4c0 F5c0 | F6c0 B0c1 F7c0 B1c1 F4c1 B2c1 …
///
/// Table entry v's forward runs table[v]; its backward runs chunk N−1−table[v].chunk on the same
/// microbatch, so each chunk's backwards are first-in, first-out.

#include <algorithm>
#include <cstddef>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/pipeline/detail/virtual_pipeline.hpp"
#include "moefold/pipeline/pipeline_action.hpp"

namespace moefold {
inline namespace v0 {

/// Interleaved 1F1B over `stages` PP ranks with `virtual_stages` chunks each. Rules (Megatron's
/// `microbatch_group_size_per_vp_stage` checks): PP ≥ 2, N ≥ 2, PP ≤ Gm ≤ M, and M mod Gm is 0 or
/// at least PP; with the default Gm = PP this means M is a multiple of PP. (Megatron's training
/// arguments also want PP > 2 without overlapped p2p; that is not a rule of the schedule.)
struct Interleaved {
  int stages = 2;          ///< PP, the number of pipeline stages (ranks)
  int virtual_stages = 2;  ///< N, model chunks per rank (Megatron's VPP size)
  int microbatches = 2;    ///< M, microbatches per step
  /// Gm, microbatches run per chunk before switching chunk; default PP.
  std::optional<int> microbatch_group_size = std::nullopt;

  /// Gm: the group size, or PP by default.
  int group_size() const noexcept { return microbatch_group_size.value_or(stages); }

  /// Throws `invalid_config` naming the first rule the numbers break.
  void validate() const {
    int const p = stages, n = virtual_stages, m = microbatches, g = group_size();
    if (p < 2)
      throw invalid_config(
          fmt::format("the interleaved schedule needs pipeline stages PP ≥ 2 (PP = {})", p));
    if (n < 2)
      throw invalid_config(fmt::format(
          "the interleaved schedule needs virtual stages per rank N ≥ 2 (N = {}); use 1F1B", n));
    if (m < 1)
      throw invalid_config(fmt::format("the interleaved schedule needs M ≥ 1 (M = {})", m));
    if (g < p)
      throw invalid_config(fmt::format(
          "microbatch group size Gm = {} must be at least the pipeline stages PP = {}", g, p));
    if (g > m)
      throw invalid_config(fmt::format(
          "microbatch group size Gm = {} must not exceed the number of microbatches M = {}{}", g, m,
          microbatch_group_size ? "" : " (default Gm = PP: M must be a multiple of PP)"));
    if (m % g != 0 && m % g < p)
      throw invalid_config(fmt::format(
          "M mod Gm must be 0 or at least PP: M = {}, Gm = {}, M mod Gm = {} < PP = {}{}", m, g,
          m % g, p, microbatch_group_size ? "" : " (default Gm = PP: M must be a multiple of PP)"));
  }
  int num_stages() const noexcept { return stages; }
  int num_chunks() const noexcept { return virtual_stages; }
  int num_microbatches() const noexcept { return microbatches; }

  /// The schedule table: M·N (microbatch, chunk) forwards in the order every rank runs them.
  std::vector<PipelineAction> table() const {
    validate();
    int const g = group_size();
    std::vector<PipelineAction> out;
    out.reserve(static_cast<std::size_t>(microbatches) * static_cast<std::size_t>(virtual_stages));
    for (int start = 0; start < microbatches; start += g) {
      int const end = start + g >= microbatches ? microbatches : start + g;  // last group: rest
      for (int c = 0; c < virtual_stages; ++c)
        for (int mb = start; mb < end; ++mb) out.push_back({PipelineOp::forward, mb, c});
    }
    return out;
  }

  /// Warm-up forwards of `stage`: min(2·(PP − stage − 1) + (N − 1)·Gm, M·N).
  int warmup(int stage) const {
    check_stage(stage);
    int const w = 2 * (stages - stage - 1) + (virtual_stages - 1) * group_size();
    return std::min(w, microbatches * virtual_stages);
  }

  /// The forwards and backwards of `stage` in order: F(0) … F(W−1); then F(W+k), B(k) for
  /// k < M·N − W; then the remaining backwards.
  std::vector<PipelineAction> compute_order(int stage) const {
    int const w = warmup(stage);
    auto const t = table();
    int const total = static_cast<int>(t.size());
    auto forward = [&](int v) { return t[static_cast<std::size_t>(v)]; };
    auto backward = [&](int v) {
      PipelineAction const& e = t[static_cast<std::size_t>(v)];
      return PipelineAction{PipelineOp::backward, e.microbatch, virtual_stages - 1 - e.chunk};
    };
    std::vector<PipelineAction> out;
    out.reserve(2 * t.size());
    for (int v = 0; v < w; ++v) out.push_back(forward(v));
    for (int k = 0; k < total - w; ++k) {
      out.push_back(forward(w + k));
      out.push_back(backward(k));
    }
    for (int v = total - w; v < total; ++v) out.push_back(backward(v));
    return out;
  }

  /// The full action list of `stage`, with the sends and receives where Megatron's interleaved
  /// schedule (without overlapped p2p) places them: one receive ahead during warm-up; in the
  /// steady state one batch after each `F B` pair that sends both results and receives the
  /// inputs of the next pair (rank 0 and rank PP−1 skip the receives their ring neighbour,
  /// running PP−1 steps apart, does not send); in the cool-down, send one gradient and receive
  /// the next. Rank PP−1's chunk c sends to rank 0's chunk c+1, and gradients flow back.
  std::vector<PipelineAction> actions(int stage) const {
    auto const order = compute_order(stage);
    auto const t = table();
    int const p = stages, n = virtual_stages, total = static_cast<int>(t.size());
    int const w = warmup(stage), r = total - w;
    detail::VirtualPipeline const vp{p, n};
    auto fchunk = [&](int v) { return t[static_cast<std::size_t>(v)].chunk; };
    auto bchunk = [&](int v) { return n - 1 - fchunk(v); };
    auto f = [&](int v) { return order[static_cast<std::size_t>(v < w ? v : w + 2 * (v - w))]; };
    auto b = [&](int v) {
      return order[static_cast<std::size_t>(v < r ? w + 2 * v + 1 : w + r + v)];
    };
    // What a receive carries: the inputs this stage consumes, in the order it consumes them
    // (FIFO per channel), so the k-th receive of a direction gets the k-th needed input.
    std::vector<PipelineAction> fwd_inputs, bwd_inputs;
    for (auto const& a : order) {
      if (a.op == PipelineOp::forward && !vp.is_first(stage, a.chunk)) fwd_inputs.push_back(a);
      if (a.op == PipelineOp::backward && !vp.is_last(stage, a.chunk)) bwd_inputs.push_back(a);
    }
    std::size_t next_fwd = 0, next_bwd = 0;
    std::vector<PipelineAction> out;
    out.reserve(3 * order.size());
    auto recv_forward = [&] {
      MOEFOLD_EXPECTS(next_fwd < fwd_inputs.size(), "stage {}: one receive_forward too many",
                      stage);
      auto const& a = fwd_inputs[next_fwd++];
      out.push_back({PipelineOp::recv_forward, a.microbatch, a.chunk, vp.prev_stage(stage)});
    };
    auto recv_backward = [&] {
      MOEFOLD_EXPECTS(next_bwd < bwd_inputs.size(), "stage {}: one receive_backward too many",
                      stage);
      auto const& a = bwd_inputs[next_bwd++];
      out.push_back({PipelineOp::recv_backward, a.microbatch, a.chunk, vp.next_stage(stage)});
    };
    auto send_forward = [&](PipelineAction const& a) {
      if (!vp.is_last(stage, a.chunk))
        out.push_back({PipelineOp::send_forward, a.microbatch, a.chunk, vp.next_stage(stage)});
    };
    auto send_backward = [&](PipelineAction const& a) {
      if (!vp.is_first(stage, a.chunk))
        out.push_back({PipelineOp::send_backward, a.microbatch, a.chunk, vp.prev_stage(stage)});
    };
    bool const first_rank = stage == 0, last_rank = stage == p - 1;
    // Whether step v (forward or backward table entry) receives from the previous stage of its
    // direction. The leading rank of a direction (rank 0 forward, rank PP−1 backward) runs PP−1
    // entries ahead of the ring neighbour that feeds it, so it receives only once that
    // neighbour has produced, and nothing from the neighbour's last chunk of the direction.
    auto receives = [&](int v, bool forward) {
      if (!(forward ? first_rank : last_rank)) return true;
      if (v < p - 1) return false;
      int const feeder = v - (p - 1);
      return forward ? fchunk(feeder) != n - 1 : bchunk(feeder) != 0;
    };

    if (!first_rank) recv_forward();  // input of F(0), chunk 0
    for (int k = 0; k < w; ++k) {     // warm-up
      out.push_back(f(k));
      send_forward(f(k));
      if (k != total - 1 && receives(k, true)) recv_forward();
      if (k == w - 1 && r > 0 && !last_rank) recv_backward();  // gradient of B(0), chunk N−1
    }
    for (int k = 0; k < r; ++k) {  // steady state: F(W+k) B(k), then one batch
      out.push_back(f(w + k));
      out.push_back(b(k));
      send_forward(f(w + k));
      send_backward(b(k));
      if (k != r - 1 && receives(w + k, true)) recv_forward();
      if (receives(k, false)) recv_backward();
    }
    if (r == 0 && !last_rank) recv_backward();  // all warm-up: gradient of B(0)
    for (int k = r; k < total; ++k) {           // cool-down
      out.push_back(b(k));
      send_backward(b(k));
      if (k != total - 1 && receives(k, false)) recv_backward();
    }
    MOEFOLD_EXPECTS(next_fwd == fwd_inputs.size() && next_bwd == bwd_inputs.size(),
                    "stage {}: {} of {} forward inputs and {} of {} gradients received", stage,
                    next_fwd, fwd_inputs.size(), next_bwd, bwd_inputs.size());
    return out;
  }

  /// The ideal idle fraction of interleaved 1F1B, (PP − 1) / (N·M + PP − 1).
  double ideal_bubble_fraction() const {
    validate();
    return static_cast<double>(stages - 1) / (virtual_stages * microbatches + stages - 1);
  }

 private:
  void check_stage(int stage) const {
    validate();
    MOEFOLD_EXPECTS(stage >= 0 && stage < stages, "stage {} is outside the pipeline of {} stages",
                    stage, stages);
  }
};

}  // namespace v0
}  // namespace moefold
