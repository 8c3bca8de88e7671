#pragma once
/// \file
/// `VocabParallelCrossEntropy`: the cross-entropy of logits split by vocabulary over `tp`,
/// without gathering the full logits (Megatron's `vocab_parallel_cross_entropy`):
///
///   m = max over tp of the local row maxima          (all-reduce max over tp, [T] values)
///   Z = Σ over tp of Σ exp(logit − m)                (all-reduce sum over tp, [T] values)
///   z_label = the owner's logit of the label, 0 elsewhere   (all-reduce sum over tp, [T])
///   loss = log Z + m − z_label
///
/// Backward: dlogits = (softmax − onehot(label)) · dloss, all local. The logits come from a
/// column-parallel output layer, so they hold every CP-local token: the losses are the same on
/// every TP rank of a CP rank. bf16 logits (`--bf16`) are widened to FP32 first: the losses,
/// the softmax and the gradient are FP32 (as Megatron's cross-entropy of `logits.float()`), the
/// logits' gradient is rounded once to bf16.

#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/cross_entropy.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

/// Cross-entropy over vocabulary-parallel logits, over `tp`.
template <ExecutionInstance Exec, class T, Communicator Comm>
class VocabParallelCrossEntropy {
 public:
  using Space = typename Exec::memory_space;
  /// The type of the losses and of everything the loss computes: FP32 for bf16 logits (as
  /// Megatron's cross-entropy of `logits.float()`), T otherwise.
  using C = compute_t<T>;

  /// `vocab`: the full vocabulary size V (divisible by TP).
  VocabParallelCrossEntropy(Exec exec, std::int64_t vocab, Comm& tp)
      : exec_(std::move(exec)), vocab_(vocab), tp_(&tp) {
    detail::require_divisible(vocab, tp.size(), "VocabParallelCrossEntropy", "vocabulary size",
                              "TP");
  }
  VocabParallelCrossEntropy(std::int64_t vocab, Comm& tp) requires std::default_initializable<Exec>
      : VocabParallelCrossEntropy(Exec{}, vocab, tp) {}
  std::int64_t local_vocab() const noexcept { return vocab_ / tp_->size(); }

  /// logits [T, V/TP] (this rank's vocabulary slice), labels [T] (host) → per-token losses
  /// [T] in `loss`. Throws when a label is outside [0, V). Collective over `tp`.
  void forward(View<T const, Space> logits, View<std::int64_t const> labels, View<C, Space> loss) {
    std::int64_t const n = local_vocab(), v0 = tp_->rank() * n;
    std::int64_t const rows = detail::rows_of(logits, n, "VocabParallelCrossEntropy");
    MOEFOLD_EXPECTS(labels.size() == rows && loss.size() == rows,
                    "VocabParallelCrossEntropy: {} labels and {} losses for {} tokens",
                    labels.size(), loss.size(), rows);
    for (std::int64_t const label : labels)
      MOEFOLD_EXPECTS(label >= 0 && label < vocab_,
                      "VocabParallelCrossEntropy: label {} outside the vocabulary [0, {})", label,
                      vocab_);
    copy(exec_, detail::flat(labels), detail::reuse(exec_, labels_, rows));
    View<C const, Space> x;
    if constexpr (std::is_same_v<T, C>) {
      x = detail::flat(logits).reshaped(rows, n);
    } else {  // bf16 logits widened to FP32
      auto const wide = detail::reuse(exec_, wide_, rows * n);
      ops::convert<Exec, T, C>(exec_, detail::flat(logits), wide);
      x = View<C const, Space>(wide).reshaped(rows, n);
    }
    auto const mx = detail::reuse(exec_, mx_, rows);
    ops::row_max(exec_, x, mx);
    tp_->all_reduce(std::span<C>(mx), ReduceOp::max);

    auto const softmax = detail::reuse(exec_, softmax_, rows * n).reshaped(rows, n);
    auto const sum = detail::reuse(exec_, sum_, rows);
    auto const target = detail::reuse(exec_, target_, rows);
    ops::sum_exp(exec_, x, mx, labels_.view(), v0, softmax, sum, target);
    tp_->all_reduce(std::span<C>(sum));
    tp_->all_reduce(std::span<C>(target));
    ops::cross_entropy_loss(exec_, sum, target, softmax, detail::flat(loss));
  }
  Buffer<C, Space> forward(View<T const, Space> logits, View<std::int64_t const> labels) {
    return detail::allocated<C>(exec_, labels.size(),
                                [&](View<C, Space> loss) { forward(logits, labels, loss); });
  }

  /// dloss [T] → dlogits [T, V/TP] in `dlogits`. Local.
  void backward(View<C const, Space> dloss, View<T, Space> dlogits) {
    std::int64_t const n = local_vocab(), v0 = tp_->rank() * n;
    auto const rows = static_cast<std::int64_t>(labels_.size());
    MOEFOLD_EXPECTS(dloss.size() == rows && dlogits.size() == rows * n,
                    "VocabParallelCrossEntropy: backward got {} values for {} tokens ({} "
                    "gradients for {}×{} logits)",
                    dloss.size(), rows, dlogits.size(), rows, n);
    if constexpr (std::is_same_v<T, C>) {
      ops::cross_entropy_grad(exec_, softmax_.view(rows, n), detail::flat(dloss), labels_.view(),
                              v0, detail::flat(dlogits).reshaped(rows, n));
    } else {  // FP32 gradients, rounded once to the logits' type
      auto const wide = detail::reuse(exec_, wide_, rows * n);
      ops::cross_entropy_grad(exec_, softmax_.view(rows, n), detail::flat(dloss), labels_.view(),
                              v0, wide.reshaped(rows, n));
      ops::convert<Exec, C, T>(exec_, wide, detail::flat(dlogits));
    }
  }
  Buffer<T, Space> backward(View<C const, Space> dloss) {
    return detail::allocated<T>(exec_, static_cast<std::int64_t>(softmax_.size()),
                                [&](View<T, Space> d) { backward(dloss, d); });
  }

  /// Per-microbatch saved softmax and labels (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, std::tie(softmax_, labels_)); }
  void restore(int mb) { stash_.restore(mb, std::tie(softmax_, labels_)); }
  void drop_stashed() { stash_.drop(); }

 private:
  Exec exec_;
  std::int64_t vocab_;
  Comm* tp_;
  Buffer<C, Space> softmax_, mx_, sum_, target_;
  Buffer<C, Space> wide_;  ///< bf16 logits (forward) and their gradients (backward) in FP32
  Buffer<std::int64_t, Space> labels_;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using VocabParallelCrossEntropy = moefold::VocabParallelCrossEntropy<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
