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
/// every TP rank of a CP rank.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/error.hpp"
#include "moefold/nn/detail/tensor.hpp"

namespace moefold {
inline namespace v0 {

/// Cross-entropy over vocabulary-parallel logits, over `tp`.
template <class T, Communicator Comm>
class VocabParallelCrossEntropy {
 public:
  /// `vocab`: the full vocabulary size V (divisible by TP).
  VocabParallelCrossEntropy(std::int64_t vocab, Comm& tp) : vocab_(vocab), tp_(&tp) {
    detail::require_divisible(vocab, tp.size(), "VocabParallelCrossEntropy", "vocabulary size",
                              "TP");
  }
  std::int64_t local_vocab() const noexcept { return vocab_ / tp_->size(); }

  /// logits [T, V/TP] (this rank's vocabulary slice), labels [T] → per-token losses [T].
  /// Throws when a label is outside [0, V). Collective over `tp`.
  std::vector<T> forward(std::span<T const> logits, std::span<std::int64_t const> labels) {
    std::int64_t const n = local_vocab(), v0 = tp_->rank() * n;
    std::int64_t const rows = detail::rows_of(logits.size(), n, "VocabParallelCrossEntropy");
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(labels.size()) == rows,
                    "VocabParallelCrossEntropy: {} labels for {} tokens", labels.size(), rows);
    labels_.assign(labels.begin(), labels.end());
    std::vector<T> mx(static_cast<std::size_t>(rows), -std::numeric_limits<T>::infinity());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t i = 0; i < n; ++i)
        mx[static_cast<std::size_t>(r)] =
            std::max(mx[static_cast<std::size_t>(r)], logits[static_cast<std::size_t>(r * n + i)]);
    tp_->all_reduce(std::span<T>(mx), ReduceOp::max);

    softmax_.resize(logits.size());
    std::vector<T> sum(static_cast<std::size_t>(rows), T{}), target(sum.size(), T{});
    for (std::int64_t r = 0; r < rows; ++r) {
      auto const ru = static_cast<std::size_t>(r);
      MOEFOLD_EXPECTS(labels[ru] >= 0 && labels[ru] < vocab_,
                      "VocabParallelCrossEntropy: label {} outside the vocabulary [0, {})",
                      labels[ru], vocab_);
      for (std::int64_t i = 0; i < n; ++i) {
        auto const k = static_cast<std::size_t>(r * n + i);
        softmax_[k] = std::exp(logits[k] - mx[ru]);
        sum[ru] += softmax_[k];
      }
      std::int64_t const local = labels[ru] - v0;
      if (local >= 0 && local < n)
        target[ru] = logits[static_cast<std::size_t>(r * n + local)] - mx[ru];
    }
    tp_->all_reduce(std::span<T>(sum));
    tp_->all_reduce(std::span<T>(target));
    std::vector<T> loss(static_cast<std::size_t>(rows));
    for (std::int64_t r = 0; r < rows; ++r) {
      auto const ru = static_cast<std::size_t>(r);
      loss[ru] = std::log(sum[ru]) - target[ru];
      for (std::int64_t i = 0; i < n; ++i) softmax_[static_cast<std::size_t>(r * n + i)] /= sum[ru];
    }
    return loss;
  }

  /// dloss [T] → dlogits [T, V/TP]. Local.
  std::vector<T> backward(std::span<T const> dloss) {
    std::int64_t const n = local_vocab(), v0 = tp_->rank() * n;
    MOEFOLD_EXPECTS(dloss.size() == labels_.size(),
                    "VocabParallelCrossEntropy: backward got {} values for {} tokens", dloss.size(),
                    labels_.size());
    std::vector<T> d(softmax_.size());
    for (std::size_t r = 0; r < labels_.size(); ++r) {
      for (std::int64_t i = 0; i < n; ++i) {
        auto const k = r * static_cast<std::size_t>(n) + static_cast<std::size_t>(i);
        d[k] = softmax_[k] * dloss[r];
      }
      std::int64_t const local = labels_[r] - v0;
      if (local >= 0 && local < n)
        d[r * static_cast<std::size_t>(n) + static_cast<std::size_t>(local)] -= dloss[r];
    }
    return d;
  }

 private:
  std::int64_t vocab_;
  Comm* tp_;
  std::vector<T> softmax_;
  std::vector<std::int64_t> labels_;
};

}  // namespace v0
}  // namespace moefold
