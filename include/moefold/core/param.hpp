#pragma once
/// \file
/// `Param<T, Space>`: a named parameter shard with its gradient, its reduction class and where its local
/// elements sit in the global tensor. Every layer of `nn/` (and the MoE layer's experts) keeps
/// its weights as `Param`s and lists them with `parameters()`, so that the gradient reduction
/// (`train/`) reduces by class and a checkpoint can be resharded under another folding.
///
///   Param<float> w("layers.0.mlp.linear_fc2.weight", ParamClass::dense, /*global*/ H, F,
///                  {{.row0 = 0, .rows = H, .col0 = t * F / TP, .cols = F / TP}});  // row-parallel
///   w.init(seed, InitDist::normal, 0.02);   // the same global tensor under every folding
///
/// Local storage is the concatenation of the blocks, each row-major: a column-parallel fc1 with
/// gate and up halves has two row blocks, a row-parallel weight one column block, a replicated
/// norm weight one block covering the whole tensor.

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/precision.hpp"

namespace moefold {
inline namespace v0 {

/// How a parameter's gradient is reduced after the microbatches of a step (spec §4.4).
enum class ParamClass : std::uint8_t {
  dense,          ///< sharded over tp (or whole when TP = 1): reduced over `dp_cp`
  tp_replicated,  ///< replicated across tp under SP (norm weights, router): `dp_cp`, then SUM over `tp`
  expert,         ///< routed-expert weights: reduced over `edp` (factor 1/(DP·CP))
};

constexpr std::string_view name(ParamClass c) noexcept {
  switch (c) {
    case ParamClass::dense: return "dense";
    case ParamClass::tp_replicated: return "tp_replicated";
    case ParamClass::expert: return "expert";
  }
  return "?";
}

/// A rectangle of the global row-major tensor held by this rank.
struct ParamBlock {
  std::int64_t row0 = 0;
  std::int64_t rows = 0;
  std::int64_t col0 = 0;
  std::int64_t cols = 0;
  std::int64_t size() const noexcept { return rows * cols; }
};

/// One rank's shard of a parameter: value and gradient (same size, `Buffer`s in `Space`), class,
/// and the blocks of the global `[global_rows, global_cols]` tensor it holds, in storage order.
template <class T, MemorySpace Space = HostSpace>
struct Param {
  std::string name;
  ParamClass cls = ParamClass::dense;
  std::int64_t global_rows = 0;
  std::int64_t global_cols = 0;
  std::vector<ParamBlock> blocks;
  Buffer<T, Space> value;
  Buffer<grad_t<T>, Space> grad;  ///< FP32 for a bf16 parameter (Megatron's main_grad)

  Param() = default;
  /// A shard of `blocks`; throws when a block leaves the global tensor.
  Param(std::string n, ParamClass c, std::int64_t rows, std::int64_t cols,
        std::vector<ParamBlock> b)
      : name(std::move(n)), cls(c), global_rows(rows), global_cols(cols), blocks(std::move(b)) {
    std::int64_t size = 0;
    for (auto const& k : blocks) {
      MOEFOLD_EXPECTS(k.row0 >= 0 && k.col0 >= 0 && k.rows >= 0 && k.cols >= 0 &&
                          k.row0 + k.rows <= rows && k.col0 + k.cols <= cols,
                      "parameter '{}': block rows [{}, {}) cols [{}, {}) outside [{}, {}]", name,
                      k.row0, k.row0 + k.rows, k.col0, k.col0 + k.cols, rows, cols);
      size += k.size();
    }
    value = Buffer<T, Space>(size);
    grad = Buffer<grad_t<T>, Space>(size);
  }
  /// A parameter held whole (one block over the whole tensor).
  static Param whole(std::string n, ParamClass c, std::int64_t rows, std::int64_t cols) {
    return Param(std::move(n), c, rows, cols, {{.row0 = 0, .rows = rows, .col0 = 0, .cols = cols}});
  }

  std::size_t size() const noexcept { return value.size(); }
  /// Sets every local element to its global initial value (core/init.hpp): a function of
  /// (seed, name, global index) only, so every folding holds slices of the same tensor.
  void init(std::uint64_t seed, InitDist dist, double scale)
    requires(Space::host_accessible)
  {
    std::size_t off = 0;
    for (auto const& k : blocks) {
      init_block(std::span<T>(value).subspan(off, static_cast<std::size_t>(k.size())), seed, name,
                 global_cols, k.row0, k.rows, k.col0, k.cols, dist, scale);
      off += static_cast<std::size_t>(k.size());
    }
  }
  void zero_grad()
    requires(Space::host_accessible)
  {
    std::fill(grad.begin(), grad.end(), grad_t<T>{});
  }

  /// This rank's elements of a global row-major tensor of this parameter's shape.
  template <class U>
  std::vector<U> local_of(std::span<U const> global) const {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(global.size()) == global_rows * global_cols,
                    "parameter '{}': global tensor has {} elements, expected {}×{}", name,
                    global.size(), global_rows, global_cols);
    std::vector<U> out;
    out.reserve(size());
    for (auto const& k : blocks)
      for (std::int64_t r = 0; r < k.rows; ++r)
        for (std::int64_t c = 0; c < k.cols; ++c)
          out.push_back(global[static_cast<std::size_t>((k.row0 + r) * global_cols + k.col0 + c)]);
    return out;
  }
};

/// Pointers to a layer's parameters, in a fixed order (the same on every rank of a folding).
template <class T>
using ParamList = std::vector<Param<T>*>;

/// Appends `more` to `list`.
template <class T>
void append(ParamList<T>& list, ParamList<T> const& more) {
  list.insert(list.end(), more.begin(), more.end());
}

}  // namespace v0
}  // namespace moefold
