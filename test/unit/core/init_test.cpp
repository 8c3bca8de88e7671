// Deterministic initialization: a value depends on (seed, name, global index) only, so any
// block of a global tensor is the same wherever it is initialized.

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moefold/core/bf16.hpp"
#include "moefold/core/init.hpp"
#include "support/catch.hpp"

using namespace moefold;

TEST_CASE("a block of a global tensor equals the same block of the whole tensor") {
  std::int64_t const rows = 12, cols = 10;
  std::vector<float> whole(static_cast<std::size_t>(rows * cols));
  init_rows(std::span<float>(whole), 42, "layer.w", cols, 0, InitDist::normal, 0.02);
  // A column shard (as ETP shards fc1) and a row shard (as TP shards a column-parallel weight).
  std::vector<float> block(4 * 3);
  init_block(std::span<float>(block), 42, "layer.w", cols, 5, 4, 6, 3, InitDist::normal, 0.02);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 3; ++c)
      CHECK(block[static_cast<std::size_t>(r * 3 + c)] ==
            whole[static_cast<std::size_t>((5 + r) * cols + 6 + c)]);
  std::vector<float> rows_3_to_5(3 * static_cast<std::size_t>(cols));
  init_rows(std::span<float>(rows_3_to_5), 42, "layer.w", cols, 3, InitDist::normal, 0.02);
  CHECK(std::equal(rows_3_to_5.begin(), rows_3_to_5.end(), whole.begin() + 3 * cols));
}

TEST_CASE("different names and seeds give different values, the same ones the same") {
  CHECK(init_value(1, "a", 0, InitDist::uniform, 1) == init_value(1, "a", 0, InitDist::uniform, 1));
  CHECK(init_value(1, "a", 0, InitDist::uniform, 1) != init_value(2, "a", 0, InitDist::uniform, 1));
  CHECK(init_value(1, "a", 0, InitDist::uniform, 1) != init_value(1, "b", 0, InitDist::uniform, 1));
  CHECK(init_value(1, "a", 0, InitDist::uniform, 1) != init_value(1, "a", 1, InitDist::uniform, 1));
  CHECK(init_value(9, "norm", 5, InitDist::constant, 1.0) == 1.0);
}

TEST_CASE("the distributions have the requested moments") {
  constexpr int kN = 200000;
  double sum = 0, sum2 = 0, lo = 1, hi = -1;
  for (int i = 0; i < kN; ++i) {
    double const v = init_value(7, "x", static_cast<std::uint64_t>(i), InitDist::normal, 2.0);
    sum += v;
    sum2 += v * v;
    double const u = init_value(7, "u", static_cast<std::uint64_t>(i), InitDist::uniform, 0.5);
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  CHECK(std::abs(sum / kN) < 0.02);
  CHECK(std::abs(std::sqrt(sum2 / kN) - 2.0) < 0.02);
  CHECK(lo >= -0.5);
  CHECK(hi < 0.5);
  CHECK(hi > 0.49);
}

TEST_CASE("bf16 rounds to nearest even and keeps NaN") {
  CHECK(static_cast<float>(bf16(1.0f)) == 1.0f);
  CHECK(static_cast<float>(bf16(1.00390625f)) == 1.0f);      // halfway: to even
  CHECK(static_cast<float>(bf16(1.01171875f)) == 1.015625f); // halfway: to even (up)
  CHECK(std::isnan(static_cast<float>(bf16(std::nanf("")))));
}

TEST_CASE("init_block rejects a buffer of the wrong size") {
  std::vector<float> out(5);
  CHECK_THROWS_AS(init_block(std::span<float>(out), 1, "w", 4, 0, 2, 0, 2, InitDist::uniform, 1),
                  error);
}
