#pragma once
/// \file
/// The expert side shared by both token dispatchers: the map from the rows a rank gathered
/// (from the all-to-all, or the all-gather) to its experts' rows, the rows' probabilities, and
/// the four moves between the two layouts — to the experts, back with probabilities applied,
/// and the backward of each.

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/moe/permutation.hpp"
#include "moefold/moe/token_dispatcher.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

/// Reuses the large temporary buffers of a dispatcher from call to call. Above glibc's mmap
/// threshold (at most 32 MB) every fresh allocation is new memory that the kernel must fault
/// in and zero on each step; a recycled buffer keeps its pages. Host buffers are recycled (and
/// handed out zeroed); buffers of another space come fresh from the instance (its allocator
/// caches them) and hold no defined values.
template <class U, MemorySpace Space = HostSpace>
class BufferPool {
 public:
  /// A buffer of `n` elements.
  template <class Exec>
  Buffer<U, Space> take(Exec const& exec, std::size_t n) {
    if constexpr (!Space::host_accessible) {
      return exec.template allocate<U>(static_cast<std::int64_t>(n));
    } else {
      std::vector<U> v = pick(n);
      v.assign(n, U{});
      return Buffer<U>(std::move(v));
    }
  }
  /// A buffer of `n` elements whose values are unspecified (a recycled buffer keeps its old
  /// values: no pass over its memory), for outputs that are written whole.
  template <class Exec>
  Buffer<U, Space> take_dirty(Exec const& exec, std::size_t n) {
    if constexpr (!Space::host_accessible) {
      return exec.template allocate<U>(static_cast<std::int64_t>(n));
    } else {
      std::vector<U> v = pick(n);
      v.resize(n);
      return Buffer<U>(std::move(v));
    }
  }
  /// Returns a buffer for reuse (a few are kept).
  void give(Buffer<U, Space>&& b) {
    if constexpr (Space::host_accessible) {
      std::vector<U> v = std::move(b);
      if (v.capacity() == 0) return;
      free_.push_back(std::move(v));
      if (free_.size() > kKeep) free_.erase(free_.begin());
    } else {
      b = Buffer<U, Space>();
    }
  }

 private:
  /// The smallest kept buffer that holds n elements, or an empty one.
  std::vector<U> pick(std::size_t n) {
    std::size_t best = free_.size();
    for (std::size_t i = 0; i < free_.size(); ++i)
      if (free_[i].capacity() >= n &&
          (best == free_.size() || free_[i].capacity() < free_[best].capacity()))
        best = i;
    std::vector<U> v;
    if (best != free_.size()) {
      v = std::move(free_[best]);
      free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    }
    return v;
  }

  static constexpr std::size_t kKeep = 6;
  std::vector<std::vector<U>> free_;
};

template <ExecutionInstance Exec, class Real>
class ExpertRows {
 public:
  using Space = typename Exec::memory_space;

  explicit ExpertRows(Exec exec) : exec_(std::move(exec)) {}
  /// The map of this plan (expert rows → gathered rows), and the gathered row count.
  void set_map(RowMapIn<Space> map) { map_ = std::move(map); }
  /// A recycled buffer of n elements (see `BufferPool`).
  Buffer<Real, Space> take(std::size_t n) { return pool_.take(exec_, n); }
  /// A recycled buffer of n elements with unspecified values (written whole by its user).
  Buffer<Real, Space> take_dirty(std::size_t n) { return pool_.take_dirty(exec_, n); }
  void give(Buffer<Real, Space>&& b) { pool_.give(std::move(b)); }
  RowMapIn<Space> const& map() const noexcept { return map_; }
  std::int64_t rows() const noexcept { return map_.rows(); }
  /// What combine and the backwards read of the last plan and forward (for a dispatcher's
  /// per-microbatch stash).
  auto saved() { return std::tie(map_, probs_, saved_output_); }

  /// Dispatch's last step: the experts' rows of `gathered` [G, H] with their probabilities.
  DispatchOutput<Real, Space> to_experts(View<Real const, Space> gathered, std::int64_t h,
                                         Buffer<Real, Space> probs,
                                         std::vector<std::int64_t> const& tokens_per_local_expert) {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(probs.size()) == rows(),
                    "dispatcher: {} probabilities for {} expert rows", probs.size(), rows());
    DispatchOutput<Real, Space> out;
    out.expert_input = exec_.template allocate<Real>(rows() * h);
    permute<Real>(exec_, map_, gathered, out.expert_input.view(), h);
    sized(probs_, rows());
    copy<Real>(exec_, View<Real const, Space>(probs.view()), probs_.view());
    out.expert_probs = std::move(probs);
    out.tokens_per_local_expert = tokens_per_local_expert;
    return out;
  }

  /// Dispatch's last step when the rows were gathered into expert order already (peer reads):
  /// keeps the probabilities for combine.
  DispatchOutput<Real, Space> adopt(Buffer<Real, Space> expert_input, Buffer<Real, Space> probs,
                                    std::vector<std::int64_t> const& tokens_per_local_expert) {
    sized(probs_, rows());
    copy<Real>(exec_, View<Real const, Space>(probs.view()), probs_.view());
    DispatchOutput<Real, Space> out;
    out.expert_input = std::move(expert_input);
    out.expert_probs = std::move(probs);
    out.tokens_per_local_expert = tokens_per_local_expert;
    return out;
  }
  /// Keeps (a copy of) the expert output for `combine_backward`.
  void keep_output(View<Real const, Space> expert_output) {
    sized(saved_output_, expert_output.size());
    copy<Real>(exec_, expert_output.reshaped(1, expert_output.size()), saved_output_.view());
  }
  /// Keeps the expert output itself (no copy); the previously kept buffer goes to the pool.
  void keep_output(Buffer<Real, Space>&& expert_output) {
    give(std::move(saved_output_));
    saved_output_ = std::move(expert_output);
  }
  /// The kept probabilities [N] and expert output [N, H].
  View<Real const, Space> probs() const noexcept { return probs_.view(); }
  View<Real const, Space> saved_output() const noexcept { return saved_output_.view(); }

  /// Combine's first step: each expert row times its probability, summed into the gathered
  /// rows [G, H]. Keeps the expert output for `combine_backward`.
  Buffer<Real, Space> combine(View<Real const, Space> expert_output, std::int64_t gathered_rows,
                              std::int64_t h, char const* who) {
    MOEFOLD_EXPECTS(expert_output.size() == rows() * h,
                    "{}::combine: expert output has {} elements, expected N·H = {}·{}", who,
                    expert_output.size(), rows(), h);
    keep_output(expert_output);
    return combine_kept(gathered_rows, h);
  }
  /// `combine` of the kept expert output (after `keep_output`).
  Buffer<Real, Space> combine_kept(std::int64_t gathered_rows, std::int64_t h) {
    auto g = take(static_cast<std::size_t>(gathered_rows * h));
    unpermute<Real>(exec_, map_, saved_output(), g.view(), h, probs_.view());
    return g;
  }

  /// Backward of `combine` from the gathered rows' gradient: d expert output (probabilities
  /// applied) and d probabilities.
  CombineGrad<Real, Space> combine_backward(View<Real const, Space> gathered_grad, std::int64_t h) {
    CombineGrad<Real, Space> out;
    out.d_expert_output = exec_.template allocate<Real>(rows() * h);
    permute<Real>(exec_, map_, gathered_grad, out.d_expert_output.view(), h, probs_.view());
    out.d_expert_probs = exec_.template allocate<Real>(rows());
    row_dots<Real>(exec_, map_, gathered_grad, saved_output_.view(), out.d_expert_probs.view(), h);
    return out;
  }

  /// Backward of `to_experts`: the expert inputs' gradient summed into the gathered rows [G, H].
  Buffer<Real, Space> dispatch_backward(View<Real const, Space> d_expert_input,
                                        View<Real const, Space> d_expert_probs,
                                        std::int64_t gathered_rows, std::int64_t h, char const* who) {
    MOEFOLD_EXPECTS(d_expert_input.size() == rows() * h && d_expert_probs.size() == rows(),
                    "{}::dispatch_backward: gradients of {} and {} elements for N = {} rows of "
                    "H = {}",
                    who, d_expert_input.size(), d_expert_probs.size(), rows(), h);
    auto g = take(static_cast<std::size_t>(gathered_rows * h));
    unpermute<Real>(exec_, map_, d_expert_input, g.view(), h);
    return g;
  }

 private:
  /// `b` as n elements (reallocated only when its size changes).
  void sized(Buffer<Real, Space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<Real>(n);
  }

  Exec exec_;
  RowMapIn<Space> map_;
  Buffer<Real, Space> probs_, saved_output_;
  BufferPool<Real, Space> pool_;
};

}  // namespace detail
}  // namespace v0
}  // namespace moefold
