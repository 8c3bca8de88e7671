#pragma once
/// \file
/// `VocabParallelEmbedding`: the word embedding `[V, H]` split by rows (vocabulary) over `tp`,
/// with sequence parallelism.
///
///   forward:  ids [S/CP, B] (the CP-local tokens, the same on every TP rank)
///             → rows of ids this rank owns, 0 elsewhere [S/CP·B, H]
///             ──reduce-scatter tp──▶ [S/(CP·TP), B, H] SP-local (the sum has one owner per id)
///   backward: dy SP-local ──all-gather tp──▶ [S/CP·B, H] → dW[id − v0] += dy for owned ids

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/embedding.hpp"

namespace moefold {
inline namespace v0 {

struct EmbeddingConfig {
  std::string name = "embedding.word_embeddings.weight";
  std::int64_t vocab = 0;   ///< padded_vocab_size V
  std::int64_t hidden = 0;  ///< hidden_size H
  std::uint64_t seed = 0;
  double init_scale = 0.02;
};

/// Vocabulary-parallel embedding over `tp` with SP output.
template <ExecutionInstance Exec, class T, Communicator Comm>
class VocabParallelEmbedding {
 public:
  using Space = typename Exec::memory_space;

  /// Throws `invalid_config` when V is not divisible by TP.
  VocabParallelEmbedding(Exec exec, EmbeddingConfig cfg, Comm& tp)
      : exec_(std::move(exec)), cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "VocabParallelEmbedding '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.vocab > 0 && cfg_.hidden > 0,
                    "{}: vocab {} and hidden {} must be positive", layer, cfg_.vocab, cfg_.hidden);
    detail::require_divisible(cfg_.vocab, tp.size(), layer, "vocabulary size", "TP");
    weight_ =
        Param<T, Space>(cfg_.name, ParamClass::dense, cfg_.vocab, cfg_.hidden,
                        {{.row0 = first(), .rows = local_vocab(), .col0 = 0, .cols = cfg_.hidden}});
    weight_.init(cfg_.seed, InitDist::normal, cfg_.init_scale);
  }
  VocabParallelEmbedding(EmbeddingConfig cfg, Comm& tp) requires std::default_initializable<Exec>
      : VocabParallelEmbedding(Exec{}, std::move(cfg), tp) {}

  std::int64_t local_vocab() const noexcept { return cfg_.vocab / tp_->size(); }
  /// First vocabulary id this rank owns.
  std::int64_t first() const noexcept { return tp_->rank() * local_vocab(); }

  /// ids: the CP-local token ids [S/CP·B] (host) → this rank's SP-local embeddings
  /// [S/(CP·TP)·B, H] in `y`. Throws when an id is outside [0, V). Collective over `tp`.
  void forward(View<std::int64_t const> ids, View<T, Space> y) {
    std::int64_t const h = cfg_.hidden, rows = ids.size();
    MOEFOLD_EXPECTS(rows % tp_->size() == 0,
                    "VocabParallelEmbedding: {} tokens do not split over TP = {}", ids.size(),
                    tp_->size());
    MOEFOLD_EXPECTS(y.size() * tp_->size() == rows * h,
                    "VocabParallelEmbedding: output of {} elements, expected {}×{}", y.size(),
                    rows / tp_->size(), h);
    for (std::int64_t const id : ids)
      MOEFOLD_EXPECTS(id >= 0 && id < cfg_.vocab,
                      "VocabParallelEmbedding: token id {} outside the vocabulary [0, {})", id,
                      cfg_.vocab);
    copy(exec_, detail::flat(ids), detail::reuse(exec_, ids_, rows));
    auto const full = detail::reuse(exec_, full_, rows * h);
    ops::embedding_gather(exec_, ids_.view(), first(), weight_.value.view(local_vocab(), h),
                          full.reshaped(rows, h));
    tp_->reduce_scatter(std::span<T const>(View<T const, Space>(full)),
                        std::span<T>(detail::flat(y)));
  }
  Buffer<T, Space> forward(View<std::int64_t const> ids) {
    return detail::allocated<T>(exec_, ids.size() / tp_->size() * cfg_.hidden,
                                [&](View<T, Space> y) { forward(ids, y); });
  }

  /// dy: SP-local [S/(CP·TP)·B, H]; accumulates the embedding gradient. Collective over `tp`.
  void backward(View<T const, Space> dy) {
    std::int64_t const h = cfg_.hidden, rows = static_cast<std::int64_t>(ids_.size());
    MOEFOLD_EXPECTS(dy.size() * tp_->size() == rows * h,
                    "VocabParallelEmbedding: backward got {} elements for {} tokens over TP = {}",
                    dy.size(), rows, tp_->size());
    auto const full = detail::reuse(exec_, full_, rows * h);
    tp_->all_gather(std::span<T const>(detail::flat(dy)), std::span<T>(full));
    // The tokens of each local id, in token order: the owner of a gradient row sums them.
    auto const key = detail::reuse(exec_, key_, rows);
    auto const counts = detail::reuse(exec_, counts_, local_vocab());
    auto const offsets = detail::reuse(exec_, offsets_, local_vocab());
    auto const order = detail::reuse(exec_, order_, rows);
    ops::local_ids(exec_, ids_.view(), first(), key);
    histogram<std::int64_t>(exec_, key, counts);
    exclusive_scan<std::int64_t>(exec_, counts, offsets);
    std::int64_t const kept = stable_sort_by_key<std::int64_t>(exec_, key, local_vocab(), order);
    ops::embedding_scatter_add(exec_, View<std::int64_t const, Space>(order.data(), kept), offsets,
                               counts, View<T const, Space>(full).reshaped(rows, h),
                               weight_.grad.view(local_vocab(), h));
  }

  Param<T, Space>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

  /// Per-microbatch saved ids (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, std::tie(ids_)); }
  void restore(int mb) { stash_.restore(mb, std::tie(ids_)); }
  void drop_stashed() { stash_.drop(); }

 private:
  Exec exec_;
  EmbeddingConfig cfg_;
  Comm* tp_;
  Param<T, Space> weight_;
  Buffer<std::int64_t, Space> ids_, key_, counts_, offsets_, order_;
  Buffer<T, Space> full_;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using VocabParallelEmbedding = moefold::VocabParallelEmbedding<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
