// The host buffers' cache (core/host_cache.hpp): a large buffer freed and allocated again on the
// same thread reuses its memory, value-initialized; small buffers, other threads and buffers
// moved out as vectors do not; the cache keeps at most kMaxKept vectors and kMaxBytes.

#include <cstdint>
#include <thread>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "support/catch.hpp"

using namespace moefold;
using Cache = detail::HostCache<float>;

namespace {
constexpr std::int64_t kLarge = (std::int64_t{1} << 20) / 4;  // 1 MiB of floats
}  // namespace

TEST_CASE("a large host buffer reuses the memory of one freed on its thread, zeroed",
          "[core][buffer][cache]") {
  if (!Cache::enabled) {
    WARN("the host cache is off in this build (AddressSanitizer)");
    return;
  }
  float const* first = nullptr;
  {
    Buffer<float> a(kLarge);
    first = a.data();
    a[5] = 7.f;
  }
  Buffer<float> b(kLarge);
  CHECK(b.data() == first);
  CHECK(b[5] == 0.f);  // value-initialized like std::vector(n)
  // A smaller request within [n, 2n] of the kept capacity also takes it; a much smaller one not.
  float const* second = b.data();
  b = Buffer<float>();
  Buffer<float> c(kLarge / 4);
  CHECK(c.data() != second);
  Buffer<float> d(kLarge * 3 / 4);
  CHECK(d.data() == second);
  CHECK(d.size() == static_cast<std::size_t>(kLarge * 3 / 4));
}

TEST_CASE("small buffers, other threads and vectors moved out are not cached",
          "[core][buffer][cache]") {
  if (!Cache::enabled) {
    WARN("the host cache is off in this build (AddressSanitizer)");
    return;
  }
  std::thread([] {  // a thread of its own: its cache starts empty
    auto& cache = *Cache::local();
    { Buffer<float> small(16); }
    CHECK(cache.kept() == 0);
    // Moved out as a vector: the caller owns the memory now.
    std::vector<float> v = Buffer<float>(kLarge);
    CHECK(cache.kept() == 0);
    { Buffer<float> kept(kLarge); }
    CHECK(cache.kept() == 1);
  }).join();
  // Another thread's cache is its own.
  float const* mine = nullptr;
  {
    Buffer<float> x(kLarge * 2);
    mine = x.data();
  }
  float const* theirs = nullptr;
  std::thread([&] {
    Buffer<float> y(kLarge * 2);
    theirs = y.data();
  }).join();
  CHECK(theirs != mine);
  Buffer<float> z(kLarge * 2);
  CHECK(z.data() == mine);
}

TEST_CASE("the cache keeps at most kMaxKept vectors and kMaxBytes per thread",
          "[core][buffer][cache]") {
  if (!Cache::enabled) {
    WARN("the host cache is off in this build (AddressSanitizer)");
    return;
  }
  std::thread([] {
    auto& cache = *Cache::local();
    {
      std::vector<Buffer<float>> many;
      for (std::size_t i = 0; i < Cache::kMaxKept + 5; ++i) many.emplace_back(kLarge);
    }
    CHECK(cache.kept() == Cache::kMaxKept);
    CHECK(cache.kept_bytes() == Cache::kMaxKept * static_cast<std::size_t>(kLarge) * sizeof(float));
    // Past the byte bound: the oldest go first.
    {
      std::vector<Buffer<float>> big;
      for (int i = 0; i < 3; ++i)
        big.emplace_back(static_cast<std::int64_t>(Cache::kMaxBytes / sizeof(float) / 2));
    }
    CHECK(cache.kept_bytes() <= Cache::kMaxBytes);
  }).join();
}
