#pragma once
/// \file
/// Grouped GEMM policies, with a CUTLASS-style protocol so that a GPU policy slots in:
/// `can_implement(problems)` says whether (and why not) the policy can run a batch,
/// `workspace_size(problems)` how many bytes of scratch it needs, `run(exec, problems,
/// workspace)` does it on the instance. A batch is a list of independent GEMMs (one or more per
/// local expert). `grouped_gemm<Policy>(exec, problems, workspace)` checks, sizes the caller's
/// reusable workspace buffer (allocated through the instance) and runs.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/format.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/exec/cpu.hpp"

namespace moefold {
inline namespace v0 {

/// One GEMM of a grouped batch: C[m×n] = alpha · op(A) · op(B) + beta · C, row-major, with
/// operands of type T and C of type `C` (for bf16 operands: bf16, or FP32 for a main gradient;
/// alpha and beta and the accumulation in `compute_t<T>`).
template <class T, class C = T>
struct GemmProblem {
  Trans trans_a = Trans::no;
  Trans trans_b = Trans::no;
  std::int64_t m = 0, n = 0, k = 0;
  compute_t<T> alpha = compute_t<T>(1);
  T const* a = nullptr;
  std::int64_t lda = 0;
  T const* b = nullptr;
  std::int64_t ldb = 0;
  compute_t<T> beta = compute_t<T>(0);
  C* c = nullptr;
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

  template <class T, class C = T>
  static GemmStatus can_implement(std::span<GemmProblem<T, C> const> problems) {
    for (std::size_t i = 0; i < problems.size(); ++i) {
      auto const& p = problems[i];
      if (p.m < 0 || p.n < 0 || p.k < 0)
        return {false, detail::format_message("problem {} has a negative size ({}×{}×{})", i,
                                               p.m, p.n, p.k)};
      if (p.m > 0 && p.n > 0 && (p.c == nullptr || (p.k > 0 && (p.a == nullptr || p.b == nullptr))))
        return {false, detail::format_message("problem {} has a null operand", i)};
    }
    return {};
  }
  template <class T, class C = T>
  static std::size_t workspace_size(std::span<GemmProblem<T, C> const>) noexcept {
    return 0;
  }
  template <class T, class C = T>
  static void run(Cpu const&, std::span<GemmProblem<T, C> const> problems,
                  View<std::byte, HostSpace> /*workspace*/) {
    for (auto const& p : problems)  // gemm<T> (float, double) or gemm<C> (bf16 operands)
      gemm(p.trans_a, p.trans_b, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c,
           p.ldc);
  }
};

/// A grouped GEMM policy for instance `Exec` (checked with float; policies are templates over
/// the element type).
template <class G, class Exec = Cpu>
concept GroupedGemmPolicy = requires(Exec const& e, std::span<GemmProblem<float> const> ps,
                                     View<std::byte, typename Exec::memory_space> ws) {
  { G::template can_implement<float>(ps) } -> std::same_as<GemmStatus>;
  { G::template workspace_size<float>(ps) } -> std::same_as<std::size_t>;
  G::template run<float>(e, ps, ws);
};

/// Runs `problems` with policy `G` on `exec`: throws `moefold::error` naming the policy and the
/// reason when it cannot, grows `workspace` (kept by the caller across calls) when it is too
/// small.
template <class G, class Exec, class T, class C>
  requires GroupedGemmPolicy<G, Exec>
void grouped_gemm(Exec const& exec, std::span<GemmProblem<T, C> const> problems,
                  Buffer<std::byte, typename Exec::memory_space>& workspace) {
  if (auto const st = G::template can_implement<T, C>(problems); !st)
    throw error(errc::invalid_argument,
                detail::format_message("grouped GEMM ({}): {}", G::name, st.reason));
  auto const bytes = G::template workspace_size<T, C>(problems);
  if (workspace.size() < bytes)
    workspace = exec.template allocate<std::byte>(static_cast<std::int64_t>(bytes));
  G::template run<T, C>(exec, problems, workspace.view());
}

static_assert(GroupedGemmPolicy<BlasGroupedGemm>);

}  // namespace v0
}  // namespace moefold
