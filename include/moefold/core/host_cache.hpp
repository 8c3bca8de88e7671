#pragma once
/// \file
/// `detail::HostCache<T>`: the large host vectors a thread freed, kept for its next buffers of a
/// similar size. A training step allocates the same large temporaries on every call (the
/// dispatcher's send and receive rows, the experts' inputs); without reuse each one is fresh
/// memory from the kernel, and page faults plus zeroing take most of a warm dispatch. A host
/// `Buffer` takes its vector from here and gives it back when it dies, so a warm step touches
/// pages it already owns. Per thread and element type (no locks: an in-process rank is a thread),
/// only trivially copyable element types, only vectors of at least `kMinBytes`, at most
/// `kMaxKept` vectors and `kMaxBytes` per thread and type; a request takes the smallest kept
/// vector whose capacity is in [n, 2n]. Elements are value-initialized as `std::vector(n)` does.
/// Off under AddressSanitizer (kept memory would hide a use after free).

#include <algorithm>
#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MOEFOLD_DETAIL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOEFOLD_DETAIL_ASAN 1
#endif
#endif
#ifndef MOEFOLD_DETAIL_ASAN
#define MOEFOLD_DETAIL_ASAN 0
#endif

namespace moefold {
inline namespace v0 {
namespace detail {

template <class T>
class HostCache {
 public:
  static constexpr std::size_t kMinBytes = std::size_t{64} << 10;   ///< 64 KiB
  static constexpr std::size_t kMaxKept = 8;
  static constexpr std::size_t kMaxBytes = std::size_t{256} << 20;  ///< 256 MiB
  /// Off under AddressSanitizer, which must see every freed buffer as freed.
  static constexpr bool enabled = std::is_trivially_copyable_v<T> && !MOEFOLD_DETAIL_ASAN;

  HostCache() { kept_.reserve(kMaxKept); }  // `give` never allocates
  HostCache(HostCache const&) = delete;
  HostCache& operator=(HostCache const&) = delete;

  /// The calling thread's cache, or null once the thread is ending (its cache is gone; a
  /// buffer that dies after it, e.g. a static one, frees its memory itself).
  static HostCache* local() noexcept {
    if (slot_.dead) return nullptr;
    if (slot_.cache == nullptr) {
      slot_.cache = new (std::nothrow) HostCache;
      thread_local Reaper reaper;  // destroys this thread's cache when the thread ends
      (void)reaper;
    }
    return slot_.cache;
  }

  /// n value-initialized elements, in a kept vector when one fits.
  std::vector<T> take(std::size_t n) {
    if constexpr (enabled) {
      if (n * sizeof(T) >= kMinBytes) {
        auto best = kept_.end();
        for (auto it = kept_.begin(); it != kept_.end(); ++it)
          if (it->capacity() >= n && it->capacity() <= 2 * n &&
              (best == kept_.end() || it->capacity() < best->capacity()))
            best = it;
        if (best != kept_.end()) {
          std::vector<T> v = std::move(*best);
          kept_.erase(best);
          bytes_ -= v.capacity() * sizeof(T);
          v.resize(n);  // value-initializes: v was cleared when kept
          return v;
        }
      }
    }
    return std::vector<T>(n);
  }

  /// Keeps `v`'s memory for a later `take` (or frees it: small, or the cache is full — the
  /// oldest kept vectors go first).
  void give(std::vector<T>&& v) noexcept {
    if constexpr (enabled) {
      std::size_t const bytes = v.capacity() * sizeof(T);
      if (bytes < kMinBytes || bytes > kMaxBytes) return;
      v.clear();
      while (!kept_.empty() && (kept_.size() >= kMaxKept || bytes_ + bytes > kMaxBytes)) {
        bytes_ -= kept_.front().capacity() * sizeof(T);
        kept_.erase(kept_.begin());
      }
      bytes_ += bytes;
      kept_.push_back(std::move(v));
    }
  }

  std::size_t kept() const noexcept { return kept_.size(); }
  std::size_t kept_bytes() const noexcept { return bytes_; }

 private:
  // Trivially destructible, so it stays readable while the thread's other thread-locals end.
  struct Slot {
    HostCache* cache = nullptr;
    bool dead = false;
  };
  struct Reaper {
    ~Reaper() {
      delete slot_.cache;
      slot_.cache = nullptr;
      slot_.dead = true;
    }
  };
  static inline thread_local Slot slot_;

  std::vector<std::vector<T>> kept_;
  std::size_t bytes_ = 0;
};

}  // namespace detail
}  // namespace v0
}  // namespace moefold
