#pragma once
/// \file
/// `View<T, Space>`: a non-owning, row-major 2-D window on elements in memory space `Space`
/// (pointer, rows, cols, leading dimension). A 1-D view is one row: `View<T>(p, n)` has rows 1
/// and cols n. Views are cheap values, usable in the ops tier's bodies on host and device
/// (`MOEFOLD_HD`); `View<T>` converts to `View<T const>`, and host views convert from and to
/// `std::span` (views of other spaces do not, so device memory never reaches host code by
/// accident).
///
///   View<float const> x(xs.data(), tokens, hidden);   // [T, H], ld = H
///   float v = x(t, j);                                 // row t, column j
///   auto r = x.row(t);                                 // 1-D view of row t
///   auto b = x.rows(t0, n);                            // rows [t0, t0+n)

#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>

#include "moefold/core/hd.hpp"
#include "moefold/core/memory_space.hpp"

namespace moefold {
inline namespace v0 {

template <class T, MemorySpace Space>
class View;

template <class V>
inline constexpr bool is_view_v = false;
template <class T, class S>
inline constexpr bool is_view_v<View<T, S>> = true;

/// A view whose elements live in `Space`: what an op run by an instance of that space
/// accepts. A view of another space passed where a `Space` view is required fails on this
/// concept (at compile time, naming it).
template <class V, class Space>
concept ViewIn = is_view_v<std::remove_cvref_t<V>> &&
                 std::is_same_v<typename std::remove_cvref_t<V>::memory_space, Space>;

template <class T, MemorySpace Space = HostSpace>
class View {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using memory_space = Space;

  constexpr View() = default;
  /// 1-D: n contiguous elements.
  MOEFOLD_HD constexpr View(T* data, std::int64_t n) noexcept
      : data_(data), rows_(1), cols_(n), ld_(n) {}
  /// 2-D: rows × cols, row r starting at data + r·ld (ld ≥ cols).
  MOEFOLD_HD constexpr View(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld) noexcept
      : data_(data), rows_(rows), cols_(cols), ld_(ld) {}
  /// 2-D, contiguous rows (ld = cols).
  MOEFOLD_HD constexpr View(T* data, std::int64_t rows, std::int64_t cols) noexcept
      : View(data, rows, cols, cols) {}
  /// View<U> → View<U const> (and any pointer conversion that keeps the element size).
  template <class U>
    requires(std::is_convertible_v<U*, T*> && sizeof(U) == sizeof(T))
  MOEFOLD_HD constexpr View(View<U, Space> const& v) noexcept  // NOLINT: implicit by design
      : data_(v.data()), rows_(v.rows()), cols_(v.cols()), ld_(v.ld()) {}
  /// A view of another memory space does not convert: host memory passed to a device op (or the
  /// reverse) stops the build here, naming `ViewIn`.
  template <class U, class OtherSpace>
    requires(!std::is_same_v<OtherSpace, Space>)
  constexpr View(View<U, OtherSpace> const&) noexcept {  // NOLINT: diagnostic only
    static_assert(ViewIn<View<U, OtherSpace>, Space>,
                  "moefold::View: a view of one memory space passed where a view of another is "
                  "required (copy it with copy(exec, src, dst) first)");
  }
  /// A host span (or anything a span converts from: std::vector, std::array, Buffer) as 1-D.
  template <class U, std::size_t N>
    requires(Space::host_accessible && std::is_convertible_v<U*, T*> && sizeof(U) == sizeof(T))
  constexpr View(std::span<U, N> s) noexcept  // NOLINT: implicit by design
      : View(s.data(), static_cast<std::int64_t>(s.size())) {}
  template <class R>
    requires(Space::host_accessible && !is_view_v<std::remove_cvref_t<R>> &&
             requires(R& r) { std::span<T>(r); })
  constexpr View(R& r) noexcept  // NOLINT: implicit by design (std::vector, Buffer)
      : View(std::span<T>(r)) {}

  MOEFOLD_HD constexpr T* data() const noexcept { return data_; }
  MOEFOLD_HD constexpr std::int64_t rows() const noexcept { return rows_; }
  MOEFOLD_HD constexpr std::int64_t cols() const noexcept { return cols_; }
  MOEFOLD_HD constexpr std::int64_t ld() const noexcept { return ld_; }
  /// rows · cols.
  MOEFOLD_HD constexpr std::int64_t size() const noexcept { return rows_ * cols_; }
  MOEFOLD_HD constexpr bool empty() const noexcept { return size() == 0; }
  /// Whether the elements are one block (ld = cols, or a single row).
  MOEFOLD_HD constexpr bool contiguous() const noexcept { return ld_ == cols_ || rows_ <= 1; }

  /// Element (r, c).
  MOEFOLD_HD constexpr T& operator()(std::int64_t r, std::int64_t c) const noexcept {
    return data_[r * ld_ + c];
  }
  /// Element i of a contiguous view.
  MOEFOLD_HD constexpr T& operator[](std::int64_t i) const noexcept { return data_[i]; }
  /// Row r as a 1-D view.
  MOEFOLD_HD constexpr View row(std::int64_t r) const noexcept { return View(data_ + r * ld_, cols_); }
  /// Rows [r0, r0 + n).
  MOEFOLD_HD constexpr View rows(std::int64_t r0, std::int64_t n) const noexcept {
    return View(data_ + r0 * ld_, n, cols_, ld_);
  }
  /// Columns [c0, c0 + n) of every row.
  MOEFOLD_HD constexpr View cols(std::int64_t c0, std::int64_t n) const noexcept {
    return View(data_ + c0, rows_, n, ld_);
  }
  /// The same contiguous elements as rows × (size / rows).
  MOEFOLD_HD constexpr View reshaped(std::int64_t rows, std::int64_t cols) const noexcept {
    return View(data_, rows, cols, cols);
  }

  /// Host views only: the contiguous elements as a span.
  constexpr operator std::span<T>() const noexcept  // NOLINT: implicit by design
    requires(Space::host_accessible)
  {
    return std::span<T>(data_, static_cast<std::size_t>(size()));
  }
  /// Host views only: iteration over a contiguous view.
  constexpr T* begin() const noexcept
    requires(Space::host_accessible)
  {
    return data_;
  }
  constexpr T* end() const noexcept
    requires(Space::host_accessible)
  {
    return data_ + size();
  }

 private:
  T* data_ = nullptr;
  std::int64_t rows_ = 0, cols_ = 0, ld_ = 0;
};

template <class T, std::size_t N>
View(std::span<T, N>) -> View<T, HostSpace>;

}  // namespace v0
}  // namespace moefold
