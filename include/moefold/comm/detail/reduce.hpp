#pragma once
/// \file
/// Element-wise reductions over type-erased buffers, in a fixed input order (so a sum is the
/// same on every rank and every run). bf16 accumulates in float and rounds once at the end.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/dtype.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

template <class Acc>
constexpr Acc combine(Acc a, Acc b, ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return a + b;
    case ReduceOp::max: return std::max(a, b);
    case ReduceOp::min: return std::min(a, b);
  }
  return a;
}

template <class T, class Acc>
void reduce_ordered_typed(std::span<void const* const> inputs, std::size_t offset, std::size_t n,
                          void* out, ReduceOp op) {
  auto* dst = static_cast<T*>(out);
  for (std::size_t i = 0; i < n; ++i) {
    Acc acc = static_cast<Acc>(static_cast<T const*>(inputs[0])[offset + i]);
    for (std::size_t r = 1; r < inputs.size(); ++r)
      acc = combine(acc, static_cast<Acc>(static_cast<T const*>(inputs[r])[offset + i]), op);
    dst[i] = static_cast<T>(acc);
  }
}

/// out[i] = inputs[0][offset+i] ∘ inputs[1][offset+i] ∘ … (left to right) for i < n.
/// `out` may alias none of the inputs.
inline void reduce_ordered(DType t, ReduceOp op, std::span<void const* const> inputs,
                           std::size_t offset, std::size_t n, void* out) {
  switch (t) {
    case DType::f32: return reduce_ordered_typed<float, float>(inputs, offset, n, out, op);
    case DType::f64: return reduce_ordered_typed<double, double>(inputs, offset, n, out, op);
    case DType::bf16: return reduce_ordered_typed<bf16, float>(inputs, offset, n, out, op);
    case DType::i32:
      return reduce_ordered_typed<std::int32_t, std::int32_t>(inputs, offset, n, out, op);
    case DType::i64:
      return reduce_ordered_typed<std::int64_t, std::int64_t>(inputs, offset, n, out, op);
    case DType::u8: return reduce_ordered_typed<std::uint8_t, int>(inputs, offset, n, out, op);
  }
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
