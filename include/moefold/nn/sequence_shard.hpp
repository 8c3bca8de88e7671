#pragma once
/// \file
/// `SequenceShard`: which tokens of a global batch `[S, B·DP, W]` (sequence-major, row-major)
/// one rank of the attention layout holds, and their positions.
///
/// The layout (Megatron's CP + SP):
///   1. DP: replica d takes sequences [d·B, (d+1)·B) of the global batch.
///   2. CP: the sequence is cut into 2·CP chunks of S/(2·CP); CP rank c holds chunks c and
///      2·CP−1−c, concatenated: its CP-local sequence has S/CP rows (balanced causal work).
///   3. SP: TP rank t holds rows [t·S/(CP·TP), (t+1)·S/(CP·TP)) of the CP-local sequence.
///
///   S = 16, CP = 2, TP = 2: chunks of 4 positions
///     cp 0: chunks 0, 3 → positions 0..3, 12..15 → tp 0: 0..3   tp 1: 12..15
///     cp 1: chunks 1, 2 → positions 4..7,  8..11 → tp 0: 4..7   tp 1: 8..11
///
/// A rank's activations are `[S/(CP·TP), B, W]` (its SP-local rows, every sequence of its
/// replica), i.e. `T = S/(CP·TP)·B` tokens of width W. All-gathering them over `tp` in rank
/// order gives the CP-local sequence `[S/CP, B, W]`.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// The tokens of one rank of the attention layout.
struct SequenceShard {
  std::int64_t seq = 1;    ///< global sequence length S
  std::int64_t batch = 1;  ///< sequences per DP replica (micro-batch size) B
  int tp = 1, tp_rank = 0;
  int cp = 1, cp_rank = 0;
  int dp = 1, dp_rank = 0;

  /// This rank's shard under `groups` (tp, cp, dp ranks from the communicators).
  template <Communicator Comm>
  static SequenceShard of(ProcessGroups<Comm>& groups, std::int64_t seq, std::int64_t batch) {
    SequenceShard s{.seq = seq,
                    .batch = batch,
                    .tp = groups.tp().size(),
                    .tp_rank = groups.tp().rank(),
                    .cp = groups.cp().size(),
                    .cp_rank = groups.cp().rank(),
                    .dp = groups.dp().size(),
                    .dp_rank = groups.dp().rank()};
    s.validate();
    return s;
  }

  /// Throws `invalid_config` when S is not divisible by 2·CP·TP (each CP chunk pair must split
  /// evenly over TP) or a size is not positive.
  void validate() const { validate_sequence(seq, tp, cp); }
  static void validate_sequence(std::int64_t seq, int tp, int cp) {
    if (tp < 1 || cp < 1 || seq < 1)
      throw invalid_config(
          fmt::format("sequence shard: S = {}, TP = {}, CP = {} must be positive", seq, tp, cp));
    std::int64_t const d = std::int64_t{2} * cp * tp;
    if (seq % d != 0)
      throw invalid_config(fmt::format(
          "sequence length S = {} is not divisible by 2·CP·TP = 2·{}·{} = {} (CP cuts the "
          "sequence into 2·CP chunks and SP splits each rank's chunks over TP)",
          seq, cp, tp, d));
  }

  std::int64_t chunk() const noexcept { return seq / (2 * cp); }       ///< S/(2·CP)
  std::int64_t cp_seq() const noexcept { return seq / cp; }            ///< S/CP
  std::int64_t local_seq() const noexcept { return seq / (cp * tp); }  ///< S/(CP·TP)
  std::int64_t local_tokens() const noexcept { return local_seq() * batch; }
  std::int64_t global_batch() const noexcept { return batch * dp; }

  /// The global position of row `i` of CP rank `c`'s CP-local sequence.
  std::int64_t cp_position(int c, std::int64_t i) const noexcept {
    return i < chunk() ? c * chunk() + i : (2 * cp - 1 - c) * chunk() + (i - chunk());
  }
  /// Positions of the CP-local sequence of CP rank `c` (S/CP entries).
  std::vector<std::int64_t> cp_positions(int c) const {
    std::vector<std::int64_t> p(static_cast<std::size_t>(cp_seq()));
    for (std::int64_t i = 0; i < cp_seq(); ++i) p[static_cast<std::size_t>(i)] = cp_position(c, i);
    return p;
  }
  std::vector<std::int64_t> cp_positions() const { return cp_positions(cp_rank); }
  /// Positions of this rank's SP-local rows (S/(CP·TP) entries), for RoPE and the causal mask.
  std::vector<std::int64_t> positions() const {
    std::vector<std::int64_t> p(static_cast<std::size_t>(local_seq()));
    for (std::int64_t j = 0; j < local_seq(); ++j)
      p[static_cast<std::size_t>(j)] = cp_position(cp_rank, tp_rank * local_seq() + j);
    return p;
  }

  /// This rank's SP-local tokens `[S/(CP·TP), B, width]` of a global `[S, B·DP, width]` batch.
  template <class U>
  std::vector<U> extract(std::span<U const> global, std::int64_t width) const {
    return gather_rows(global, positions(), width);
  }
  /// This rank's CP-local tokens `[S/CP, B, width]` (what every TP rank of the CP rank sees
  /// after the SP all-gather: token ids and labels of the vocab-parallel layers).
  template <class U>
  std::vector<U> extract_cp(std::span<U const> global, std::int64_t width) const {
    return gather_rows(global, cp_positions(), width);
  }
  /// Writes this rank's SP-local tokens back into their places of a global batch (the inverse
  /// of `extract`).
  template <class U>
  void insert(std::span<U const> local, std::span<U> global, std::int64_t width) const {
    auto const pos = positions();
    check_sizes(global.size(), width);
    MOEFOLD_EXPECTS(local.size() == pos.size() * static_cast<std::size_t>(batch * width),
                    "SequenceShard::insert: local holds {} elements, expected {}·{}·{}",
                    local.size(), pos.size(), batch, width);
    std::size_t const run = static_cast<std::size_t>(batch * width);
    for (std::size_t j = 0; j < pos.size(); ++j)
      std::copy_n(local.begin() + static_cast<std::ptrdiff_t>(j * run), run,
                  global.begin() + static_cast<std::ptrdiff_t>(offset(pos[j], width)));
  }

 private:
  std::size_t offset(std::int64_t position, std::int64_t width) const {
    return static_cast<std::size_t>((position * global_batch() + dp_rank * batch) * width);
  }
  void check_sizes(std::size_t global_size, std::int64_t width) const {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(global_size) == seq * global_batch() * width,
                    "SequenceShard: global batch holds {} elements, expected S·B·DP·width = "
                    "{}·{}·{}·{}",
                    global_size, seq, batch, dp, width);
  }
  template <class U>
  std::vector<U> gather_rows(std::span<U const> global, std::vector<std::int64_t> const& pos,
                             std::int64_t width) const {
    check_sizes(global.size(), width);
    std::size_t const run = static_cast<std::size_t>(batch * width);
    std::vector<U> out(pos.size() * run);
    for (std::size_t j = 0; j < pos.size(); ++j)
      std::copy_n(global.begin() + static_cast<std::ptrdiff_t>(offset(pos[j], width)), run,
                  out.begin() + static_cast<std::ptrdiff_t>(j * run));
    return out;
  }
};

}  // namespace v0
}  // namespace moefold
