#pragma once
/// \file
/// `Buffer<T, Space>`: owning, contiguous storage of n elements in memory space `Space`,
/// allocated through an execution instance (`exec.allocate<T>(n)`, exec/cpu.hpp). A host
/// buffer behaves like `std::vector` (it keeps one: size, resize, assign, iteration, indexing),
/// so host code reads it as it read vectors; a device buffer only hands out its pointer and
/// views (its memory comes from `Space::allocate`: `cuda::allocate` for `CudaSpace`, defined in
/// component `moefold::cuda`).
///
///   auto y = exec.template allocate<float>(rows * cols);   // Buffer<float, HostSpace>
///   View<float> v = y.view(rows, cols);

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>
#include <vector>

#include "moefold/core/host_cache.hpp"
#include "moefold/core/memory_space.hpp"
#include "moefold/core/view.hpp"

namespace moefold {
inline namespace v0 {

/// Owning storage of `T` in `Space` (device spaces: move-only, uninitialized).
template <class T, MemorySpace Space = HostSpace>
class Buffer {
 public:
  using value_type = T;
  using memory_space = Space;

  Buffer() = default;
  explicit Buffer(std::int64_t n)
      : data_(static_cast<T*>(Space::allocate(static_cast<std::size_t>(n) * sizeof(T)))), size_(n) {}
  Buffer(Buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  Buffer(Buffer const&) = delete;
  Buffer& operator=(Buffer const&) = delete;
  ~Buffer() { Space::deallocate(data_); }

  T* data() noexcept { return data_; }
  T const* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return static_cast<std::size_t>(size_); }
  bool empty() const noexcept { return size_ == 0; }
  View<T, Space> view() noexcept { return View<T, Space>(data_, size_); }
  View<T const, Space> view() const noexcept { return View<T const, Space>(data_, size_); }
  View<T, Space> view(std::int64_t rows, std::int64_t cols) noexcept {
    return View<T, Space>(data_, rows, cols);
  }
  View<T const, Space> view(std::int64_t rows, std::int64_t cols) const noexcept {
    return View<T const, Space>(data_, rows, cols);
  }
  operator View<T, Space>() noexcept { return view(); }              // NOLINT: implicit
  operator View<T const, Space>() const noexcept { return view(); }  // NOLINT: implicit

 private:
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

/// Host storage: a `std::vector<T>` with views. Large vectors come from and go back to the
/// thread's `detail::HostCache` (core/host_cache.hpp), so a warm step reuses its memory.
template <class T>
class Buffer<T, HostSpace> {
 public:
  using value_type = T;
  using memory_space = HostSpace;
  using iterator = T*;
  using const_iterator = T const*;

  Buffer() = default;
  /// n value-initialized elements.
  explicit Buffer(std::int64_t n) : v_(fresh(static_cast<std::size_t>(n))) {}
  Buffer(std::int64_t n, T const& value) : v_(fresh(static_cast<std::size_t>(n))) {
    std::fill(v_.begin(), v_.end(), value);
  }
  Buffer(Buffer const&) = default;
  Buffer(Buffer&&) noexcept = default;
  Buffer& operator=(Buffer const&) = default;
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      v_ = std::move(o.v_);
    }
    return *this;
  }
  ~Buffer() { release(); }
  Buffer(std::initializer_list<T> init) : v_(init) {}
  Buffer(std::vector<T> v) noexcept : v_(std::move(v)) {}  // NOLINT: implicit by design
  template <class It>
  Buffer(It first, It last) : v_(first, last) {}

  T* data() noexcept { return v_.data(); }
  T const* data() const noexcept { return v_.data(); }
  std::size_t size() const noexcept { return v_.size(); }
  bool empty() const noexcept { return v_.empty(); }
  T& operator[](std::size_t i) noexcept { return v_[i]; }
  T const& operator[](std::size_t i) const noexcept { return v_[i]; }
  T* begin() noexcept { return v_.data(); }
  T* end() noexcept { return v_.data() + v_.size(); }
  T const* begin() const noexcept { return v_.data(); }
  T const* end() const noexcept { return v_.data() + v_.size(); }
  T& front() noexcept { return v_.front(); }
  T& back() noexcept { return v_.back(); }
  T const& front() const noexcept { return v_.front(); }
  T const& back() const noexcept { return v_.back(); }

  void resize(std::size_t n) { v_.resize(n); }
  void resize(std::size_t n, T const& value) { v_.resize(n, value); }
  void assign(std::size_t n, T const& value) { v_.assign(n, value); }
  template <class It>
  void assign(It first, It last) {
    v_.assign(first, last);
  }
  void clear() noexcept { v_.clear(); }
  void reserve(std::size_t n) { v_.reserve(n); }
  void push_back(T const& x) { v_.push_back(x); }
  void swap(Buffer& o) noexcept { v_.swap(o.v_); }

  View<T> view() noexcept { return View<T>(v_.data(), static_cast<std::int64_t>(v_.size())); }
  View<T const> view() const noexcept {
    return View<T const>(v_.data(), static_cast<std::int64_t>(v_.size()));
  }
  View<T> view(std::int64_t rows, std::int64_t cols) noexcept {
    return View<T>(v_.data(), rows, cols);
  }
  View<T const> view(std::int64_t rows, std::int64_t cols) const noexcept {
    return View<T const>(v_.data(), rows, cols);
  }
  /// The elements as a vector: moved out of an rvalue buffer, copied otherwise.
  operator std::vector<T>() && noexcept { return std::move(v_); }  // NOLINT: implicit by design
  operator std::vector<T>() const& { return v_; }                   // NOLINT: implicit by design
  std::vector<T> const& vector() const& noexcept { return v_; }
  std::vector<T>& vector() & noexcept { return v_; }

  friend bool operator==(Buffer const& a, Buffer const& b) { return a.v_ == b.v_; }

 private:
  static std::vector<T> fresh(std::size_t n) {
    auto* cache = detail::HostCache<T>::local();
    return cache ? cache->take(n) : std::vector<T>(n);
  }
  void release() noexcept {
    if (v_.capacity() != 0)
      if (auto* cache = detail::HostCache<T>::local()) cache->give(std::move(v_));
    v_ = std::vector<T>();
  }

  std::vector<T> v_;
};

}  // namespace v0
}  // namespace moefold
