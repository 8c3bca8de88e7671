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
#include <span>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/param.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {

/// Concatenates the gradients of `params` of class `cls`, runs `reduce` on the flat bucket, and
/// scatters it back.
template <class T, class Reduce>
void reduce_bucket(ParamList<T> const& params, ParamClass cls, Reduce&& reduce) {
  std::size_t n = 0;
  for (auto* p : params)
    if (p->cls == cls) n += p->grad.size();
  std::vector<T> bucket;
  bucket.reserve(n);
  for (auto* p : params)
    if (p->cls == cls) bucket.insert(bucket.end(), p->grad.begin(), p->grad.end());
  reduce(std::span<T>(bucket));
  std::size_t off = 0;
  for (auto* p : params)
    if (p->cls == cls) {
      std::copy(bucket.begin() + static_cast<std::ptrdiff_t>(off),
                bucket.begin() + static_cast<std::ptrdiff_t>(off + p->grad.size()),
                p->grad.begin());
      off += p->grad.size();
    }
}

}  // namespace detail

/// Reduces every parameter's gradient by its class (table above), each gradient first multiplied
/// by `pre_scale` (Megatron's 1/(DP·CP); 1 in per-token-loss mode, spec §4.1). `params` must list
/// the same parameters in the same order on every rank of each group.
/// Collective over `dp_cp`, `tp` and `edp`: every rank must call it.
template <class T, Communicator C>
void reduce_gradients(ParamList<T> const& params, ProcessGroups<C>& groups, T pre_scale) {
  if (pre_scale != T(1))
    for (auto* p : params)
      for (auto& g : p->grad) g *= pre_scale;
  detail::reduce_bucket(params, ParamClass::dense,
                        [&](std::span<T> b) { groups.dp_cp().all_reduce(b, ReduceOp::sum); });
  detail::reduce_bucket(params, ParamClass::tp_replicated, [&](std::span<T> b) {
    groups.dp_cp().all_reduce(b, ReduceOp::sum);
    groups.tp().all_reduce(b, ReduceOp::sum);
  });
  detail::reduce_bucket(params, ParamClass::expert,
                        [&](std::span<T> b) { groups.edp().all_reduce(b, ReduceOp::sum); });
}

/// `reduce_gradients` with Megatron's default pre-scale 1/(DP·CP).
template <class T, Communicator C>
void reduce_gradients(ParamList<T> const& params, ProcessGroups<C>& groups) {
  FoldedMapping const& fold = groups.mapping();
  reduce_gradients(params, groups, T(1) / static_cast<T>(fold.dp() * fold.cp()));
}

/// The L2 norm of all gradients, counting every distinct parameter element once: dense shards
/// are distinct over `mp` (tp-pp), tp-replicated parameters are counted on TP rank 0 only,
/// expert shards are distinct over `tp_ep_pp`; replicas over `dp_cp` and `edp` are not
/// counted again. Call after `reduce_gradients`. Every rank gets the same value.
/// Collective over `mp` and `tp_ep_pp`: every rank must call it.
template <class T, Communicator C>
double global_grad_norm(ParamList<T> const& params, ProcessGroups<C>& groups) {
  std::vector<double> model_parallel{0.0}, expert{0.0};
  bool const tp_first = groups.tp().rank() == 0;
  for (auto* p : params) {
    double s = 0;
    for (T g : p->grad) s += static_cast<double>(g) * static_cast<double>(g);
    switch (p->cls) {
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
template <class T, Communicator C>
double clip_grad_norm(ParamList<T> const& params, ProcessGroups<C>& groups, double max_norm) {
  double const norm = global_grad_norm(params, groups);
  double const coeff = max_norm / (norm + 1e-6);
  if (coeff < 1.0)
    for (auto* p : params)
      for (auto& g : p->grad) g = static_cast<T>(static_cast<double>(g) * coeff);
  return norm;
}

}  // namespace v0
}  // namespace moefold
