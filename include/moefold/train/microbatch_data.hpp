#pragma once
/// \file
/// The data order of DESIGN §3, independent of the folding: step s trains on the global-batch
/// sequences s·GB … s·GB+GB−1 of one deterministic stream; the global batch is cut into
/// microbatches of B·DP sequences (B = micro-batch size), and DP rank d takes the d-th slice of B
/// sequences of each. Within its replica a rank holds its CP-local tokens
/// (`SequenceShard::extract_cp`), inputs, next-byte labels and global token indices.

#include <cstdint>
#include <span>
#include <vector>

#include "moefold/nn/sequence_shard.hpp"
#include "moefold/train/decoder_stage.hpp"
#include "moefold/train/text_corpus.hpp"

namespace moefold {
inline namespace v0 {

/// This rank's tokens of microbatch `mb` of the batch whose first sequence is
/// `first_sequence` (s·GB for step s): the global microbatch `[S, B·DP]` (sequence-major, column
/// j = stream sequence first_sequence + mb·B·DP + j) cut to `shard`'s CP-local tokens.
inline MicrobatchTokens microbatch_tokens(TextCorpus const& corpus, Split split,
                                          std::uint64_t first_sequence, int mb,
                                          SequenceShard const& shard, std::uint64_t seed) {
  std::int64_t const s = shard.seq, cols = shard.global_batch();
  std::vector<std::int64_t> ids(static_cast<std::size_t>(s * cols)), labels(ids.size()),
      index(ids.size());
  for (std::int64_t j = 0; j < cols; ++j) {
    auto const index_of_sequence = first_sequence + static_cast<std::uint64_t>(mb * cols + j);
    auto const seq = corpus.sequence(split, index_of_sequence, s, seed);
    for (std::int64_t p = 0; p < s; ++p) {
      auto const at = static_cast<std::size_t>(p * cols + j);
      ids[at] = seq[static_cast<std::size_t>(p)];
      labels[at] = seq[static_cast<std::size_t>(p + 1)];
      index[at] = static_cast<std::int64_t>(index_of_sequence) * s + p;
    }
  }
  return {shard.extract_cp(std::span<std::int64_t const>(ids), 1),
          shard.extract_cp(std::span<std::int64_t const>(labels), 1),
          shard.extract_cp(std::span<std::int64_t const>(index), 1)};
}

}  // namespace v0
}  // namespace moefold
