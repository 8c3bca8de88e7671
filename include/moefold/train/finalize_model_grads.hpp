#pragma once
/// \file
/// `finalize_model_grads`: the step finalizer, one call after the microbatches of a training step
/// — the analogue of Megatron's `finalize_model_grads` (spec §4.3):
///
///   1. gradients reduced by parameter class (`reduce_gradients`: dense over dp_cp,
///      TP-replicated also over tp, experts over edp);
///   2. the routers' expert biases updated from the step's counts, all routers' counters summed
///      over tp_dp_cp in one collective (spec §2.2.2);
///   3. per-step state reset (the global aux loss's running counts, the statistics kept for
///      recomputation);
///   4. with `calculate_per_token_loss`, every gradient divided by the global token count (the
///      last stage's count, summed over pp and dp_cp).
///
///   stage.begin_step(m, source, /*training=*/true, step);
///   run_pipeline(schedule, groups.pp(), stage);
///   moefold::finalize_model_grads(stage, groups);
///   moefold::clip_grad_norm(stage.exec(), params, groups, 1.0);
///   opt.step(lr);
///
/// With the distributed optimizer, step 1 reduce-scatters into its shards instead:
/// `finalize_model_grads(stage, groups, dist_opt)`, then `dist_opt.clip_grad_norm(1.0)`.

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/train/gradient_reduction.hpp"

namespace moefold {
inline namespace v0 {

/// A reference to an execution instance (what a stage's `exec()` returns).
template <class E>
concept ExecutionInstanceRef = ExecutionInstance<std::remove_cvref_t<E>>;

/// A block with router state that the finalizer ends each step (the MoE layer).
template <class B>
concept RouterStateBlock = requires(B& b) {
  { b.expert_bias_counts() } -> std::same_as<std::span<std::int64_t>>;
  b.apply_expert_bias_update();
  b.reset_step_state();
};

/// A model the finalizer can finalize: its execution instance, its parameters, its MLP slots,
/// its loss tokens (`DecoderStage` is one).
template <class S>
concept FinalizableStage = requires(S& s) {
  { s.exec() } -> ExecutionInstanceRef;
  s.parameters();
  s.for_each_mlp([](auto&) {});
  { s.loss_tokens_in_step() } -> std::convertible_to<std::int64_t>;
};

/// The finalizer's options (Megatron's names).
struct FinalizeOptions {
  /// Megatron's `calculate_per_token_loss` (the stage's and the routers' configs must agree).
  bool calculate_per_token_loss = false;
};

/// Steps 2 and 3 of the finalizer: expert biases updated, per-step router state reset.
template <FinalizableStage Stage, Communicator C>
void finish_router_step(Stage& stage, ProcessGroups<C>& groups) {
  // f(mlp) for every MLP slot with router state.
  auto each_router = [&stage](auto&& f) {
    stage.for_each_mlp([&](auto& mlp) {
      if constexpr (RouterStateBlock<std::remove_cvref_t<decltype(mlp)>>) f(mlp);
    });
  };
  // Expert bias: every router's counters in one all-reduce over tp_dp_cp (the same layers, in
  // the same order, on every rank of the group: it lies within one pipeline stage).
  std::vector<std::int64_t> counts;
  each_router([&](auto& mlp) {
    auto const c = mlp.expert_bias_counts();
    counts.insert(counts.end(), c.begin(), c.end());
  });
  if (!counts.empty()) {
    groups.tp_dp_cp().all_reduce(std::span<std::int64_t>(counts));
    std::size_t at = 0;
    each_router([&](auto& mlp) {
      auto c = mlp.expert_bias_counts();
      std::copy_n(counts.begin() + static_cast<std::ptrdiff_t>(at), c.size(), c.begin());
      at += c.size();
      mlp.apply_expert_bias_update();
    });
  }
  each_router([](auto& mlp) { mlp.reset_step_state(); });
}

/// What reduces a step's gradients: `reduce_gradients(pre_scale)` (collective, by class) and
/// `scale_gradients(a)` on the reduced gradients — the all-reduce path (`AllReducedGradients`)
/// or the distributed optimizer (reduce-scatter into its shards).
template <class R, class T>
concept GradientReducer = requires(R& r, T a) {
  r.reduce_gradients(a);
  r.scale_gradients(a);
};

/// The all-reduce path: every rank's gradients (`grad_t<T>`) reduced in place
/// (`reduce_gradients`).
template <ExecutionInstance Exec, class T, Communicator C>
struct AllReducedGradients {
  Exec const& exec;
  ParamList<T> const& params;
  ProcessGroups<C>& groups;
  void reduce_gradients(grad_t<T> pre_scale) {
    moefold::reduce_gradients(exec, params, groups, pre_scale);
  }
  void scale_gradients(grad_t<T> a) {
    for (auto* p : params)
      ops::scale(exec, a, View<grad_t<T>, typename Exec::memory_space>(p->grad));
  }
};

/// Ends a training step of `stage` (see the file comment), its gradients reduced by `reducer`;
/// returns the global token count in per-token-loss mode, 0 otherwise. Collective over dp_cp,
/// tp, edp, tp_dp_cp (and pp in per-token mode): every rank must call it, once per step.
template <FinalizableStage Stage, Communicator C, class Reducer>
  requires(!std::same_as<std::remove_cvref_t<Reducer>, FinalizeOptions>)
std::int64_t finalize_model_grads(Stage& stage, ProcessGroups<C>& groups, Reducer& reducer,
                                  FinalizeOptions const& opt = {}) {
  auto const params = stage.parameters();
  using T = std::remove_cvref_t<decltype(*params.front()->grad.data())>;
  static_assert(GradientReducer<Reducer, T>, "finalize_model_grads: not a GradientReducer");
  std::int64_t tokens = 0;
  if (opt.calculate_per_token_loss) {
    reducer.reduce_gradients(T(1));
    std::vector<std::int64_t> n{stage.loss_tokens_in_step()};
    groups.pp().all_reduce(std::span<std::int64_t>(n));  // only the last stage counts
    groups.dp_cp().all_reduce(std::span<std::int64_t>(n));
    tokens = n[0];
    reducer.scale_gradients(T(1) / static_cast<T>(std::max<std::int64_t>(tokens, 1)));
  } else {
    FoldedMapping const& fold = groups.mapping();
    reducer.reduce_gradients(T(1) / static_cast<T>(fold.dp() * fold.cp()));
  }
  finish_router_step(stage, groups);
  return tokens;
}

/// `finalize_model_grads` with the gradients all-reduced in place.
template <FinalizableStage Stage, Communicator C>
std::int64_t finalize_model_grads(Stage& stage, ProcessGroups<C>& groups,
                                  FinalizeOptions const& opt = {}) {
  auto const params = stage.parameters();
  using T = std::remove_cvref_t<decltype(*params.front()->value.data())>;
  using Exec = std::remove_cvref_t<decltype(stage.exec())>;
  AllReducedGradients<Exec, T, C> reducer{stage.exec(), params, groups};
  return finalize_model_grads(stage, groups, reducer, opt);
}

}  // namespace v0
}  // namespace moefold
