#pragma once
/// \file
/// `VocabParallelEmbedding`: the word embedding `[V, H]` split by rows (vocabulary) over `tp`,
/// with sequence parallelism.
///
///   forward:  ids [S/CP, B] (the CP-local tokens, the same on every TP rank)
///             → rows of ids this rank owns, 0 elsewhere [S/CP·B, H]
///             ──reduce-scatter tp──▶ [S/(CP·TP), B, H] SP-local (the sum has one owner per id)
///   backward: dy SP-local ──all-gather tp──▶ [S/CP·B, H] → dW[id − v0] += dy for owned ids

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/init.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/core/param.hpp"

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
template <class T, Communicator Comm>
class VocabParallelEmbedding {
 public:
  /// Throws `invalid_config` when V is not divisible by TP.
  VocabParallelEmbedding(EmbeddingConfig cfg, Comm& tp) : cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "VocabParallelEmbedding '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.vocab > 0 && cfg_.hidden > 0,
                    "{}: vocab {} and hidden {} must be positive", layer, cfg_.vocab, cfg_.hidden);
    detail::require_divisible(cfg_.vocab, tp.size(), layer, "vocabulary size", "TP");
    weight_ = Param<T>(cfg_.name, ParamClass::dense, cfg_.vocab, cfg_.hidden,
                       {{.row0 = first(), .rows = local_vocab(), .col0 = 0, .cols = cfg_.hidden}});
    weight_.init(cfg_.seed, InitDist::normal, cfg_.init_scale);
  }

  std::int64_t local_vocab() const noexcept { return cfg_.vocab / tp_->size(); }
  /// First vocabulary id this rank owns.
  std::int64_t first() const noexcept { return tp_->rank() * local_vocab(); }

  /// ids: the CP-local token ids [S/CP·B] → this rank's SP-local embeddings [S/(CP·TP)·B, H].
  /// Throws when an id is outside [0, V). Collective over `tp`.
  std::vector<T> forward(std::span<std::int64_t const> ids) {
    std::int64_t const h = cfg_.hidden;
    MOEFOLD_EXPECTS(ids.size() % static_cast<std::size_t>(tp_->size()) == 0,
                    "VocabParallelEmbedding: {} tokens do not split over TP = {}", ids.size(),
                    tp_->size());
    ids_.assign(ids.begin(), ids.end());
    std::vector<T> full(ids.size() * static_cast<std::size_t>(h), T{});
    for (std::size_t r = 0; r < ids.size(); ++r) {
      MOEFOLD_EXPECTS(ids[r] >= 0 && ids[r] < cfg_.vocab,
                      "VocabParallelEmbedding: token id {} outside the vocabulary [0, {})", ids[r],
                      cfg_.vocab);
      std::int64_t const local = ids[r] - first();
      if (local >= 0 && local < local_vocab())
        std::copy_n(weight_.value.data() + local * h, h,
                    full.data() + static_cast<std::int64_t>(r) * h);
    }
    std::vector<T> y(full.size() / static_cast<std::size_t>(tp_->size()));
    tp_->reduce_scatter(detail::cspan(full), std::span<T>(y));
    return y;
  }

  /// dy: SP-local [S/(CP·TP)·B, H]; accumulates the embedding gradient. Collective over `tp`.
  void backward(std::span<T const> dy) {
    std::int64_t const h = cfg_.hidden;
    std::vector<T> full(ids_.size() * static_cast<std::size_t>(h));
    tp_->all_gather(dy, std::span<T>(full));
    for (std::size_t r = 0; r < ids_.size(); ++r) {
      std::int64_t const local = ids_[r] - first();
      if (local < 0 || local >= local_vocab()) continue;
      T* g = weight_.grad.data() + local * h;
      T const* src = full.data() + static_cast<std::int64_t>(r) * h;
      for (std::int64_t i = 0; i < h; ++i) g[i] += src[i];
    }
  }

  Param<T>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

 private:
  EmbeddingConfig cfg_;
  Comm* tp_;
  Param<T> weight_;
  std::vector<std::int64_t> ids_;
};

}  // namespace v0
}  // namespace moefold
