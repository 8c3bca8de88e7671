#pragma once
/// \file
/// Rotary position embeddings (RoPE), Megatron's "rotate half" form on the whole head: for
/// i < d/2 and θᵢ = pos · base^(−2i/d),
///
///   out[i]       = x[i]·cos θᵢ − x[i+d/2]·sin θᵢ
///   out[i+d/2]   = x[i+d/2]·cos θᵢ + x[i]·sin θᵢ
///
/// (in double). `RopeTable` fills cos/sin of every (position, frequency) pair; `RotateHeads`
/// moves head vectors between two layouts (`HeadLayout`: the packed `[rows, heads, d]` one and
/// the group-interleaved qkv rows of attention), rotating them by θ, by −θ (the backward), or
/// not at all (values).
///
///   ops::rope_table(exec, positions, head_dim, base, cos, sin);
///   ops::rotate_heads(exec, src, src_layout, dst, dst_layout, rows, heads, batch, cos, sin, +1);

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/view_args.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// Element k = p·half + i: cos/sin of θ = pos[p] · base^(−2i/d).
struct RopeTable {
  std::int64_t const* pos;
  double* cos_table;
  double* sin_table;
  std::int64_t half, head_dim;
  double base;
  MOEFOLD_HD void operator()(std::int64_t k) const {
    using std::cos;
    using std::pow;
    using std::sin;
    std::int64_t const p = k / half, i = k % half;
    double const inv_freq = pow(base, -2.0 * double(i) / double(head_dim));
    double const theta = double(pos[p]) * inv_freq;
    cos_table[k] = cos(theta);
    sin_table[k] = sin(theta);
  }
};

/// Where head h of row r starts: r·ld + ((h / per)·stride + base + h % per)·d. Packed
/// `[rows, heads, d]`: {heads·d, 1, 1, 0, d}; attention's qkv row (groups of q/g query heads,
/// a key head, a value head): queries {w, q/g, q/g+2, 0, d}, keys {w, 1, q/g+2, q/g, d},
/// values {w, 1, q/g+2, q/g+1, d}.
struct HeadLayout {
  std::int64_t ld, per, stride, base, d;
  MOEFOLD_HD std::int64_t offset(std::int64_t r, std::int64_t h) const {
    return r * ld + ((h / per) * stride + base + h % per) * d;
  }
  MOEFOLD_HD static HeadLayout packed(std::int64_t heads, std::int64_t d) {
    return {heads * d, 1, 1, 0, d};
  }
};

/// Index i = r·heads + h: dst's head h of row r = src's, rotated by sign·θ of position r / batch
/// (sign 0: copied unrotated).
template <class T>
struct RotateHeads {
  T const* src;
  T* dst;
  HeadLayout sl, dl;
  double const* cos_table;
  double const* sin_table;
  std::int64_t heads, batch, half;
  double sign;
  MOEFOLD_HD void operator()(std::int64_t idx) const {
    std::int64_t const r = idx / heads, h = idx % heads;
    T const* x = src + sl.offset(r, h);
    T* y = dst + dl.offset(r, h);
    if (sign == 0.0) {
      for (std::int64_t i = 0; i < 2 * half; ++i) y[i] = x[i];
      return;
    }
    std::int64_t const k0 = (r / batch) * half;
    for (std::int64_t i = 0; i < half; ++i) {
      double const c = cos_table[k0 + i], s = sign * sin_table[k0 + i];
      double const a = double(widen(x[i])), b = double(widen(x[i + half]));
      y[i] = narrow<T>(a * c - b * s);
      y[i + half] = narrow<T>(b * c + a * s);
    }
  }
};

/// cos, sin [positions, head_dim/2] of `positions`.
template <class Exec>
void rope_table(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> positions,
                std::int64_t head_dim, double base, View<double, typename Exec::memory_space> cos,
                View<double, typename Exec::memory_space> sin) {
  MOEFOLD_EXPECTS(head_dim > 0 && head_dim % 2 == 0,
                  "rotary embedding needs an even head dimension (got {})", head_dim);
  std::int64_t const half = head_dim / 2;
  MOEFOLD_EXPECTS(cos.size() == positions.size() * half && sin.size() == cos.size(),
                  "ops::rope_table: {} positions of {} frequencies, tables of {} and {}",
                  positions.size(), half, cos.size(), sin.size());
  for_each(exec, cos.size(),
           RopeTable{positions.data(), cos.data(), sin.data(), half, head_dim, base});
}

/// For every row r < rows and head h < heads: dst(r, h) = rotate(src(r, h), sign·θ(r / batch))
/// (sign +1 forward, −1 backward, 0 a plain copy); the tables hold rows / batch positions.
template <class Exec, class T>
void rotate_heads(Exec const& exec, InView<Exec, T> src, HeadLayout sl, OutView<Exec, T> dst,
                  HeadLayout dl, std::int64_t rows, std::int64_t heads, std::int64_t batch,
                  View<double const, typename Exec::memory_space> cos,
                  View<double const, typename Exec::memory_space> sin, double sign) {
  std::int64_t const half = sl.d / 2;
  MOEFOLD_EXPECTS(sl.d == dl.d && sl.d % 2 == 0 && batch > 0 && rows % batch == 0 &&
                      cos.size() >= rows / batch * half && sin.size() == cos.size(),
                  "ops::rotate_heads: head dims {} and {}, {} rows of batch {}, tables of {}", sl.d,
                  dl.d, rows, batch, cos.size());
  MOEFOLD_EXPECTS(rows == 0 || heads == 0 ||
                      (sl.offset(rows - 1, heads - 1) + sl.d <= src.size() &&
                       dl.offset(rows - 1, heads - 1) + dl.d <= dst.size()),
                  "ops::rotate_heads: {} rows of {} heads outside views of {} and {} elements",
                  rows, heads, src.size(), dst.size());
  for_each(exec, rows * heads,
           RotateHeads<T>{src.data(), dst.data(), sl, dl, cos.data(), sin.data(), heads, batch,
                          half, sign});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
