#pragma once
/// \file
/// Rotary position embeddings (RoPE), Megatron's default "rotate half" form on the whole head:
/// for i < d/2 and θᵢ = pos · base^(−2i/d),
///
///   out[i]       = x[i]·cos θᵢ − x[i+d/2]·sin θᵢ
///   out[i+d/2]   = x[i+d/2]·cos θᵢ + x[i]·sin θᵢ
///
/// A rotation, so its backward is the rotation by −θ. Positions are global sequence positions
/// (`SequenceShard::cp_positions`), which makes RoPE independent of the folding. The bodies are
/// ops/rope.hpp's; `RotaryTable` holds the cos/sin tables in the instance's memory.

#include <cstdint>

#include "moefold/core/buffer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/rope.hpp"

namespace moefold {
inline namespace v0 {

/// cos/sin of every (position, frequency) pair of a list of positions, in `Exec`'s memory.
template <ExecutionInstance Exec>
class RotaryTable {
 public:
  using Space = typename Exec::memory_space;

  RotaryTable() = default;
  /// Throws when `head_dim` is odd.
  RotaryTable(Exec const& exec, View<std::int64_t const, Space> positions, std::int64_t head_dim,
              double base) {
    assign(exec, positions, head_dim, base);
  }
  /// Recomputes the tables for `positions` (reusing their memory when the size is unchanged).
  void assign(Exec const& exec, View<std::int64_t const, Space> positions, std::int64_t head_dim,
              double base) {
    MOEFOLD_EXPECTS(head_dim > 0 && head_dim % 2 == 0,
                    "rotary embedding needs an even head dimension (got {})", head_dim);
    std::int64_t const n = positions.size() * (head_dim / 2);
    if (static_cast<std::int64_t>(cos_.size()) != n) {
      cos_ = exec.template allocate<double>(n);
      sin_ = exec.template allocate<double>(n);
    }
    ops::rope_table(exec, positions, head_dim, base, cos_.view(), sin_.view());
  }

  View<double const, Space> cos() const noexcept { return cos_.view(); }
  View<double const, Space> sin() const noexcept { return sin_.view(); }

 private:
  Buffer<double, Space> cos_, sin_;
};

}  // namespace v0
}  // namespace moefold
