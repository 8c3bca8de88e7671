#pragma once
/// \file
/// The vocabulary-parallel embedding's row gather and its backward scatter-add
/// (nn/vocab_parallel_embedding.hpp). This rank owns vocabulary rows [first, first + n):
///
///   EmbeddingGather     y[r, ·] = w[ids[r] − first, ·] for owned ids, 0 elsewhere
///   LocalIds            key[r] = ids[r] − first (outside [0, n): not this rank's)
///   EmbeddingScatterAdd dw[v, ·] += Σ dy[r, ·] over the tokens r of local id v, r ascending
///                       (`order` lists the tokens by local id, stably; `offsets`/`counts` are
///                       each id's run in it: the owner of row v sums it, no two bodies write
///                       the same row)
///
///   ops::embedding_gather(exec, ids, first, w, y);
///   ops::embedding_scatter_add(exec, order, offsets, counts, dy, dw);

#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/view_args.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// Element k = r·h + i.
template <class T>
struct EmbeddingGather {
  std::int64_t const* ids;
  T const* w;
  T* y;
  std::int64_t first, n, h;
  MOEFOLD_HD void operator()(std::int64_t k) const {
    std::int64_t const r = k / h, i = k % h;
    std::int64_t const local = ids[r] - first;
    y[k] = local >= 0 && local < n ? w[local * h + i] : T{};
  }
};

struct LocalIds {
  std::int64_t const* ids;
  std::int64_t* key;
  std::int64_t first;
  MOEFOLD_HD void operator()(std::int64_t r) const { key[r] = ids[r] - first; }
};

/// Row v of dw.
template <class T, class G = T>
struct EmbeddingScatterAdd {
  std::int64_t const* order;
  std::int64_t const* offsets;
  std::int64_t const* counts;
  T const* dy;
  G* dw;  ///< grad_t<T>: FP32 for bf16 activations
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t v) const {
    G* MOEFOLD_RESTRICT g = dw + v * h;
    std::int64_t const end = offsets[v] + counts[v];
    for (std::int64_t j = offsets[v]; j < end; ++j) {
      T const* MOEFOLD_RESTRICT src = dy + order[j] * h;
      for (std::int64_t i = 0; i < h; ++i) g[i] += widen(src[i]);
    }
  }
};

/// y [rows, h]: the rows of w [n, h] (vocabulary ids [first, first + n)) for ids [rows].
template <class Exec, class T>
void embedding_gather(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> ids,
                      std::int64_t first, InView<Exec, T> w, OutView<Exec, T> y) {
  MOEFOLD_EXPECTS(
      w.contiguous() && y.contiguous() && y.rows() == ids.size() && y.cols() == w.cols(),
      "ops::embedding_gather: {} ids, table {}×{}, output {}×{}", ids.size(), w.rows(), w.cols(),
      y.rows(), y.cols());
  for_each(exec, y.size(),
           EmbeddingGather<T>{ids.data(), w.data(), y.data(), first, w.rows(), w.cols()});
}

/// key [rows] = ids − first.
template <class Exec>
void local_ids(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> ids,
               std::int64_t first, View<std::int64_t, typename Exec::memory_space> key) {
  MOEFOLD_EXPECTS(ids.size() == key.size(), "ops::local_ids: {} ids, {} keys", ids.size(),
                  key.size());
  for_each(exec, ids.size(), LocalIds{ids.data(), key.data(), first});
}

/// dw [n, h] += the rows of dy [rows, h] by local id; order/offsets/counts as above.
template <class Exec, class T>
void embedding_scatter_add(Exec const& exec,
                           View<std::int64_t const, typename Exec::memory_space> order,
                           View<std::int64_t const, typename Exec::memory_space> offsets,
                           View<std::int64_t const, typename Exec::memory_space> counts,
                           View<T const, typename Exec::memory_space> dy,
                           std::type_identity_t<OutView<Exec, grad_t<T>>> dw) {
  MOEFOLD_EXPECTS(
      dy.contiguous() && dw.contiguous() && dy.cols() == dw.cols() && offsets.size() == dw.rows() &&
          counts.size() == dw.rows() && order.size() <= dy.rows(),
      "ops::embedding_scatter_add: dy {}×{}, dw {}×{}, {} offsets, {} counts, {} "
      "ordered tokens",
      dy.rows(), dy.cols(), dw.rows(), dw.cols(), offsets.size(), counts.size(), order.size());
  for_each_row(exec, dw.rows(),
               EmbeddingScatterAdd<T, grad_t<T>>{order.data(), offsets.data(), counts.data(), dy.data(),
                                      dw.data(), dw.cols()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
