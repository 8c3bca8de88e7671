#pragma once
/// \file
/// Gradient reduction by parameter class after the microbatches of a step (spec §4), and the
/// global gradient norm for clipping.
///
/// | class          | reduction                                                        |
/// |----------------|------------------------------------------------------------------|
/// | dense          | × 1/(DP·CP), SUM over `dp_cp`                                    |
/// | tp_replicated  | × 1/(DP·CP), SUM over `dp_cp`, then SUM over `tp` (SP replicas)   |
/// | expert         | × 1/(DP·CP), SUM over `edp` — not 1/EDP: an expert's gradient on  |
/// |                | one rank already holds the tokens of all its EP peers             |
///
/// Convention (Megatron's): each rank's loss is the mean over the tokens of its own data-parallel
/// shard (equal shard sizes), so after reduction every gradient is the gradient of the mean loss
/// over the global batch, i.e. the single-rank gradient. Each class is reduced as one flat
/// bucket (one collective per class).

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/param.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/gradients.hpp"

namespace moefold {
inline namespace v0 {

// Gradients are `grad_t<T>` (FP32 main gradients for a bf16 model, Megatron's
// --accumulate-allreduce-grads-in-fp32): they are scaled, reduced and clipped in that type.

namespace detail {

/// Concatenates the gradients of `params` of class `cls` into a flat bucket of the instance's
/// memory, runs `reduce` on it, and copies it back.
template <class Exec, class T, class Reduce>
void reduce_bucket(Exec const& exec, ParamList<T> const& params, ParamClass cls, Reduce&& reduce) {
  using Space = typename Exec::memory_space;
  using G = grad_t<T>;
  std::int64_t n = 0;
  for (auto* p : params)
    if (p->cls == cls) n += static_cast<std::int64_t>(p->grad.size());
  auto bucket = exec.template allocate<G>(n);
  std::int64_t off = 0;
  for (auto* p : params)
    if (p->cls == cls) {
      auto const size = static_cast<std::int64_t>(p->grad.size());
      copy(exec, View<G const, Space>(p->grad), bucket.view().cols(off, size));
      off += size;
    }
  exec.fence();
  reduce(std::span<G>(bucket.view()));  // the communicator reads host memory here
  off = 0;
  for (auto* p : params)
    if (p->cls == cls) {
      auto const size = static_cast<std::int64_t>(p->grad.size());
      copy(exec, View<G const, Space>(bucket.view().cols(off, size)), View<G, Space>(p->grad));
      off += size;
    }
}

}  // namespace detail

/// Reduces every parameter's gradient by its class (table above), each gradient first multiplied
/// by `pre_scale` (Megatron's 1/(DP·CP); 1 in per-token-loss mode, spec §4.1). `params` must list
/// the same parameters in the same order on every rank of each group.
/// Collective over `dp_cp`, `tp` and `edp`: every rank must call it.
template <ExecutionInstance Exec, class T, Communicator C>
void reduce_gradients(Exec const& exec, ParamList<T> const& params, ProcessGroups<C>& groups,
                      grad_t<T> pre_scale) {
  using G = grad_t<T>;
  if (pre_scale != G(1))
    for (auto* p : params)
      ops::scale(exec, pre_scale, View<G, typename Exec::memory_space>(p->grad));
  // A sum over a group of one is the identity: such a group's bucket is neither gathered nor
  // reduced (the sizes agree on every member, so every member skips alike).
  bool const dp_cp = groups.dp_cp().size() > 1, tp = groups.tp().size() > 1;
  if (dp_cp)
    detail::reduce_bucket(exec, params, ParamClass::dense,
                          [&](std::span<G> b) { groups.dp_cp().all_reduce(b, ReduceOp::sum); });
  if (dp_cp || tp)
    detail::reduce_bucket(exec, params, ParamClass::tp_replicated, [&](std::span<G> b) {
      if (dp_cp) groups.dp_cp().all_reduce(b, ReduceOp::sum);
      if (tp) groups.tp().all_reduce(b, ReduceOp::sum);
    });
  if (groups.edp().size() > 1)
    detail::reduce_bucket(exec, params, ParamClass::expert,
                          [&](std::span<G> b) { groups.edp().all_reduce(b, ReduceOp::sum); });
}

/// `reduce_gradients` with Megatron's default pre-scale 1/(DP·CP).
template <ExecutionInstance Exec, class T, Communicator C>
void reduce_gradients(Exec const& exec, ParamList<T> const& params, ProcessGroups<C>& groups) {
  FoldedMapping const& fold = groups.mapping();
  reduce_gradients(exec, params, groups,
                   grad_t<T>(1) / static_cast<grad_t<T>>(fold.dp() * fold.cp()));
}

/// The L2 norm of all gradients, counting every distinct parameter element once: dense shards
/// are distinct over `mp` (tp-pp), tp-replicated parameters are counted on TP rank 0 only,
/// expert shards are distinct over `tp_ep_pp`; replicas over `dp_cp` and `edp` are not
/// counted again. Call after `reduce_gradients`. Every rank gets the same value.
/// Collective over `mp` and `tp_ep_pp`: every rank must call it.
template <ExecutionInstance Exec, class T, Communicator C>
double global_grad_norm(Exec const& exec, ParamList<T> const& params, ProcessGroups<C>& groups) {
  using Space = typename Exec::memory_space;
  // Σ g² of each parameter (one body per parameter, in element order), then summed by class on
  // the host in parameter order.
  auto sums = exec.template allocate<double>(static_cast<std::int64_t>(params.size()));
  for (std::size_t k = 0; k < params.size(); ++k)
    ops::sum_of_squares(exec, View<grad_t<T> const, Space>(params[k]->grad),
                        sums.view().cols(static_cast<std::int64_t>(k), 1));
  Buffer<double> host(static_cast<std::int64_t>(params.size()));
  copy(exec, View<double const, Space>(sums.view()), host.view());
  exec.fence();
  std::vector<double> model_parallel{0.0}, expert{0.0};
  bool const tp_first = groups.tp().rank() == 0;
  for (std::size_t k = 0; k < params.size(); ++k) {
    double const s = host[k];
    switch (params[k]->cls) {
      case ParamClass::dense:
        model_parallel[0] += s;
        break;
      case ParamClass::tp_replicated:
        model_parallel[0] += tp_first ? s : 0.0;
        break;
      case ParamClass::expert:
        expert[0] += s;
        break;
    }
  }
  groups.mp().all_reduce(std::span<double>(model_parallel));
  groups.tp_ep_pp().all_reduce(std::span<double>(expert));
  return std::sqrt(model_parallel[0] + expert[0]);
}

/// Scales every gradient by min(1, max_norm / (norm + 1e-6)) (Megatron's clip_grad_norm) and
/// returns the norm before clipping. Collective like `global_grad_norm`.
template <ExecutionInstance Exec, class T, Communicator C>
double clip_grad_norm(Exec const& exec, ParamList<T> const& params, ProcessGroups<C>& groups,
                      double max_norm) {
  double const norm = global_grad_norm(exec, params, groups);
  double const coeff = max_norm / (norm + 1e-6);
  if (coeff < 1.0)
    for (auto* p : params)
      ops::scale_in_double(exec, coeff, View<grad_t<T>, typename Exec::memory_space>(p->grad));
  return norm;
}

}  // namespace v0
}  // namespace moefold
