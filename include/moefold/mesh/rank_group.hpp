#pragma once
/// \file
/// `RankGroup`: one process group as a slice of a process mesh, i.e. a sub-layout
/// (extents : strides of the axes that vary inside the group) plus a base rank.
///
///   mesh tp2·cp2·dp2, tp fastest:  rank = tp + 2·cp + 4·dp
///
///            cp=0  cp=1
///     dp=0   0 1   2 3        the cp group of rank 5 (tp 1, cp 0, dp 1) is the slice
///     dp=1   4 5   6 7        extents {2} : strides {2}, base 1 + 4·1 = 5  ->  {5, 7}
///
/// Members are enumerated in mixed radix, first varying axis fastest, so they come out in
/// ascending rank order, exactly as Megatron lists them.

#include <array>
#include <optional>
#include <vector>

namespace moefold {
inline namespace v0 {

/// Most axes a mesh may have.
inline constexpr int kMaxMeshAxes = 6;

/// A process group described as a layout: `rank(m) = base + Σ_i c_i(m) · stride_i` where the
/// `c_i(m)` are the mixed-radix digits of the member index `m` over `extents`.
class RankGroup {
 public:
  constexpr RankGroup() = default;
  /// A group over `n` varying axes with the given extents and strides (in the parent mesh),
  /// starting at `base`.
  constexpr RankGroup(int n, std::array<int, kMaxMeshAxes> const& extents,
                      std::array<int, kMaxMeshAxes> const& strides, int base) noexcept
      : n_(n), extents_(extents), strides_(strides), base_(base) {
    size_ = 1;
    for (int i = 0; i < n_; ++i) size_ *= extents_[i];
  }

  /// Number of members.
  constexpr int size() const noexcept { return size_; }
  /// The rank of member `m` (0 ≤ m < size()).
  constexpr int operator[](int m) const noexcept {
    int rank = base_;
    for (int i = 0; i < n_; ++i) {
      rank += (m % extents_[i]) * strides_[i];
      m /= extents_[i];
    }
    return rank;
  }
  /// The smallest member (member 0).
  constexpr int base() const noexcept { return base_; }
  /// The member index of `rank` (its rank within the group), or nullopt when not a member.
  constexpr std::optional<int> index_of(int rank) const noexcept {
    int const rel = rank - base_;
    if (rel < 0) return std::nullopt;
    int m = 0;
    int radix = 1;
    for (int i = 0; i < n_; ++i) {
      m += ((rel / strides_[i]) % extents_[i]) * radix;
      radix *= extents_[i];
    }
    if ((*this)[m] != rank) return std::nullopt;
    return m;
  }
  constexpr bool contains(int rank) const noexcept { return index_of(rank).has_value(); }
  /// The members in order.
  std::vector<int> ranks() const {
    std::vector<int> out(static_cast<std::size_t>(size_));
    for (int m = 0; m < size_; ++m) out[static_cast<std::size_t>(m)] = (*this)[m];
    return out;
  }

 private:
  int n_ = 0;
  std::array<int, kMaxMeshAxes> extents_{};
  std::array<int, kMaxMeshAxes> strides_{};
  int base_ = 0;
  int size_ = 1;
};

}  // namespace v0
}  // namespace moefold
