#pragma once
/// \file
/// Grouped GEMM policies for the experts, with a CUTLASS-style protocol so that a GPU policy
/// slots in: `can_implement(problems)` says whether (and why not) the policy can run a batch,
/// `workspace_size(problems)` how many bytes of scratch it needs, `run(problems, workspace)`
/// does it. A batch is a list of independent GEMMs (one or more per local expert).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "moefold/exec/blas.hpp"

namespace moefold {
inline namespace v0 {

/// One GEMM of a grouped batch: C[m×n] = alpha · op(A) · op(B) + beta · C, row-major.
template <class T>
struct GemmProblem {
  Trans trans_a = Trans::no;
  Trans trans_b = Trans::no;
  std::int64_t m = 0, n = 0, k = 0;
  T alpha = T(1);
  T const* a = nullptr;
  std::int64_t lda = 0;
  T const* b = nullptr;
  std::int64_t ldb = 0;
  T beta = T(0);
  T* c = nullptr;
  std::int64_t ldc = 0;
};

/// The outcome of `can_implement`: ok, or the reason.
struct GemmStatus {
  bool ok = true;
  std::string reason{};
  explicit operator bool() const noexcept { return ok; }
};

/// CPU grouped GEMM: one BLAS call per problem (empty problems are skipped).
struct BlasGroupedGemm {
  static constexpr std::string_view name = "blas";

  template <class T>
  static GemmStatus can_implement(std::span<GemmProblem<T> const> problems) {
    for (std::size_t i = 0; i < problems.size(); ++i) {
      auto const& p = problems[i];
      if (p.m < 0 || p.n < 0 || p.k < 0)
        return {false, fmt::format("problem {} has a negative size ({}×{}×{})", i, p.m, p.n, p.k)};
      if (p.m > 0 && p.n > 0 && (p.c == nullptr || (p.k > 0 && (p.a == nullptr || p.b == nullptr))))
        return {false, fmt::format("problem {} has a null operand", i)};
    }
    return {};
  }
  template <class T>
  static std::size_t workspace_size(std::span<GemmProblem<T> const>) noexcept {
    return 0;
  }
  template <class T>
  static void run(std::span<GemmProblem<T> const> problems, std::span<std::byte> /*workspace*/) {
    for (auto const& p : problems)
      gemm<T>(p.trans_a, p.trans_b, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c,
              p.ldc);
  }
};

/// A grouped GEMM policy (checked with float; policies are templates over the element type).
template <class G>
concept GroupedGemmPolicy = requires(std::span<GemmProblem<float> const> ps,
                                     std::span<std::byte> ws) {
  { G::template can_implement<float>(ps) } -> std::same_as<GemmStatus>;
  { G::template workspace_size<float>(ps) } -> std::same_as<std::size_t>;
  G::template run<float>(ps, ws);
};

static_assert(GroupedGemmPolicy<BlasGroupedGemm>);

}  // namespace v0
}  // namespace moefold
