#pragma once
/// \file
/// The context-parallel key/value exchange of causal attention.
///
/// Layout (see sequence_shard.hpp): the sequence is cut into 2·CP chunks; CP rank c holds chunks
/// c and 2·CP−1−c. Its queries need the keys and values of every earlier position, which other
/// CP ranks hold.
///
/// Choice: **all-gather** the (rotated) keys and values over `cp` in forward, and
/// **reduce-scatter** their gradients over `cp` in backward (Megatron's `cp_comm_type =
/// "all_gather"`). A ring moves the same bytes in CP−1 steps and could overlap them with the
/// attention blocks; the all-gather is one collective, needs no per-step softmax rescaling, and
/// keeps the causal mask exact by construction: every query compares its global position with
/// the global position of every gathered key.
///
/// Bytes per rank and layer, with D = (local KV groups)·head_dim and element size e:
///   forward  all-gather:      2 (K and V) · (CP−1) · (S/CP)·B·D·e received
///   backward reduce-scatter:  the same, sent
/// The causal minimum: rank c needs chunks 0 … 2·CP−1−c, and holds two of them, so it must
/// receive 2·CP−2−c chunks of S/(2·CP) positions; over the CP ranks that is
/// CP·(2·CP−2) − CP·(CP−1)/2 chunks against CP·(2·CP−2) moved: a ratio of 4/3 for every CP ≥ 2
/// (`cp_exchange_chunks`).

#include <cstdint>
#include <span>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/view.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/sequence_shard.hpp"

namespace moefold {
inline namespace v0 {

/// Global positions of the all-gathered CP-local sequences, in gather order (CP rank 0's S/CP
/// rows, then rank 1's, …): the key positions of the causal mask.
inline std::vector<std::int64_t> gathered_positions(SequenceShard const& shard) {
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(shard.seq));
  for (int c = 0; c < shard.cp; ++c) {
    auto const p = shard.cp_positions(c);
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

/// Every CP rank's `local` [S/CP·B, D] rows, concatenated in CP rank order into `full`
/// [S·B, D]. Collective over `cp`.
template <class T, Communicator Comm>
void cp_all_gather(Comm& cp, View<T const> local, View<T> full) {
  cp.all_gather(std::span<T const>(detail::flat(local)), std::span<T>(detail::flat(full)));
}
template <class T, Communicator Comm>
std::vector<T> cp_all_gather(Comm& cp, std::span<T const> local) {
  std::vector<T> full(local.size() * static_cast<std::size_t>(cp.size()));
  cp_all_gather<T>(cp, View<T const>(local), View<T>(full));
  return full;
}

/// The gradient of `cp_all_gather`: sums `full` [S·B, D] over `cp` into this rank's block
/// `local` [S/CP·B, D]. Collective over `cp`.
template <class T, Communicator Comm>
void cp_reduce_scatter(Comm& cp, View<T const> full, View<T> local) {
  MOEFOLD_EXPECTS(full.size() % cp.size() == 0 && local.size() * cp.size() == full.size(),
                  "cp_reduce_scatter: {} elements do not split over CP = {} into {}", full.size(),
                  cp.size(), local.size());
  cp.reduce_scatter(std::span<T const>(detail::flat(full)), std::span<T>(detail::flat(local)));
}
template <class T, Communicator Comm>
std::vector<T> cp_reduce_scatter(Comm& cp, std::span<T const> full) {
  MOEFOLD_EXPECTS(full.size() % static_cast<std::size_t>(cp.size()) == 0,
                  "cp_reduce_scatter: {} elements do not split over CP = {}", full.size(),
                  cp.size());
  std::vector<T> local(full.size() / static_cast<std::size_t>(cp.size()));
  cp_reduce_scatter<T>(cp, View<T const>(full), View<T>(local));
  return local;
}

/// Chunks (of S/(2·CP) positions, K and V counted once) that one direction of the exchange
/// moves over all CP ranks, and the causal minimum.
struct CpExchangeChunks {
  std::int64_t moved = 0;
  std::int64_t minimum = 0;
};
constexpr CpExchangeChunks cp_exchange_chunks(std::int64_t cp) noexcept {
  CpExchangeChunks c;
  for (std::int64_t r = 0; r < cp; ++r) {
    c.moved += 2 * cp - 2;
    c.minimum += 2 * cp - 2 - r;
  }
  return c;
}

}  // namespace v0
}  // namespace moefold
