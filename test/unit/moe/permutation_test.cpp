// Permutation primitives: stable expert-major order, permute / weighted unpermute and their
// backward, the chunk sort by local expert and its inverse.

#include <numeric>
#include <vector>

#include "moe_test_support.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/permutation.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;
using Catch::Matchers::Contains;

TEST_CASE("expert-major order is stable: by expert, then by token", "[moe][permutation]") {
  // Tokens 0..3 over 3 experts.
  std::vector<int> ids{2, 0, 0, 1, 2, 1, 0, 2};
  std::vector<float> p{0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f};
  auto const r = Routing<float>::from_top_k(4, 3, 2, ids, p);
  auto const o = ExpertMajorOrder::of(test::Exec{}, r);
  CHECK(std::vector<std::int64_t>(o.tokens.row_targets().begin(), o.tokens.row_targets().end()) ==
        std::vector<std::int64_t>{0, 1, 3, 1, 2, 0, 2, 3});
  CHECK(o.tokens_per_expert == std::vector<std::int64_t>{3, 2, 3});
  CHECK(o.probs(r) == std::vector<float>{0.2f, 0.3f, 0.7f, 0.4f, 0.6f, 0.1f, 0.5f, 0.8f});
}

TEST_CASE("permute then weighted unpermute gives Σ_k p_k·row, with exact backward",
          "[moe][permutation]") {
  std::int64_t const T = 5, E = 4, H = 3;
  auto const r = test::test_routing<double>(0, T, static_cast<int>(E), 2, test::Skew::uniform);
  auto const o = ExpertMajorOrder::of(test::Exec{}, r);
  auto const x = test::tensor<double>("x", 0, T, H);
  std::vector<double> rows(static_cast<std::size_t>(o.tokens.rows() * H));
  permute<double>(test::Exec{}, o.tokens, x, rows, H);
  auto const p = o.probs(r);
  // Expert e doubles its rows' scale: rows of expert e are multiplied by (e+1).
  for (std::size_t i = 0; i < p.size(); ++i)
    for (std::int64_t c = 0; c < H; ++c)
      rows[i * H + static_cast<std::size_t>(c)] *= static_cast<double>(o.entry[i] % E + 1);
  std::vector<double> y(static_cast<std::size_t>(T * H));
  unpermute<double>(test::Exec{}, o.tokens, rows, y, H, p);
  auto const g = test::tensor<double>("g", 0, T, H);
  auto const ref = test::serial_moe<double>(r, x, std::vector<double>(x.size(), 0.0), H);
  // serial_moe uses f_e(x) = (e+1)·x + e; remove the + e part: Σ p·e.
  auto expect = ref.y;
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t c = 0; c < H; ++c)
        expect[static_cast<std::size_t>(t * H + c)] -=
            r.probs[static_cast<std::size_t>(t * E + e)] * static_cast<double>(e);
  CHECK(test::rel_error(y, expect) <= 1e-12);

  // Backward of the weighted unpermute: d_rows = p·permute(g), d_p = ⟨g[token], row⟩.
  std::vector<double> d_rows(rows.size()), d_p(p.size());
  permute<double>(test::Exec{}, o.tokens, g, d_rows, H, p);
  row_dots<double>(test::Exec{}, o.tokens, g, rows, d_p, H);
  for (std::size_t i = 0; i < p.size(); ++i) {
    auto const t = static_cast<std::size_t>(o.tokens.target(static_cast<std::int64_t>(i)));
    double dot = 0;
    for (std::size_t c = 0; c < static_cast<std::size_t>(H); ++c) {
      CHECK(d_rows[i * H + c] == Approx(p[i] * g[t * H + c]));
      dot += g[t * H + c] * rows[i * H + c];
    }
    CHECK(d_p[i] == Approx(dot));
  }
  // Backward of permute is the unweighted unpermute: Σ over a token's rows.
  std::vector<double> dx(x.size());
  unpermute<double>(test::Exec{}, o.tokens, d_rows, dx, H);
  for (std::int64_t t = 0; t < T; ++t) {
    double psum = 0;
    for (std::int64_t e = 0; e < E; ++e) psum += r.probs[static_cast<std::size_t>(t * E + e)];
    CHECK(dx[static_cast<std::size_t>(t * H)] == Approx(psum * g[static_cast<std::size_t>(t * H)]));
  }
}

TEST_CASE("chunk sort by local expert and its inverse restore the order", "[moe][permutation]") {
  // 2 sources × 3 local experts, chunk sizes NG in (source, expert) order.
  std::vector<std::int64_t> ng{1, 0, 2, 2, 1, 0};
  auto const sort_in = transpose_order(2, 3);
  CHECK(sort_in == std::vector<std::int64_t>{0, 3, 1, 4, 2, 5});
  auto const fwd = sort_chunks(ng, sort_in);
  // Rows: src0 = {0 | - | 1 2}, src1 = {3 4 | 5 | -} → expert 0: 0 3 4; expert 1: 5; expert 2: 1 2.
  CHECK(fwd == std::vector<std::int64_t>{0, 3, 4, 5, 1, 2});
  // restore_out over the sorted sizes (expert-major) is the inverse.
  std::vector<std::int64_t> sorted_sizes;
  for (auto c : sort_in) sorted_sizes.push_back(ng[static_cast<std::size_t>(c)]);
  auto const back = sort_chunks(sorted_sizes, transpose_order(3, 2));
  std::vector<std::int64_t> composed;
  for (auto i : back) composed.push_back(fwd[static_cast<std::size_t>(i)]);
  std::vector<std::int64_t> id(6);
  std::iota(id.begin(), id.end(), 0);
  CHECK(composed == id);
  std::vector<float> x{0, 1, 2, 3, 4, 5}, y(6);
  gather_rows<float>(test::Exec{}, fwd, x, y, 1);
  CHECK(y == std::vector<float>{0, 3, 4, 5, 1, 2});
}

TEST_CASE("a row map with a target out of range gives a clear error",
          "[moe][permutation][errors]") {
  std::string msg;
  try {
    RowMap bad({0, 3}, 2);
  } catch (error const& e) {
    msg = e.what();
  }
  CHECK_THAT(msg, Contains("RowMap: target 3 outside [0, 2)"));
}
