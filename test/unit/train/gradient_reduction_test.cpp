// Gradient reduction by class and the global gradient norm, on synthetic gradients whose
// replicas differ in a known way, across foldings (EDP > 1, EP spanning TP and CP, ETP > 1,
// PP > 1): dense → mean over dp_cp; tp-replicated → mean over dp_cp then sum over tp; expert →
// sum over edp / (DP·CP). The norm counts every distinct element once.

#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;

namespace {

double base(std::int64_t idx) { return 0.25 * static_cast<double>(idx % 7) - 0.5; }

struct RankResult {
  std::map<std::pair<std::string, std::int64_t>, double> grads;  // (name, global index) → grad
  double norm = 0;
  std::string failure;
};

}  // namespace

TEST_CASE("gradients are reduced by class and the norm counts each element once") {
  std::vector<FoldingConfig> const foldings{
      {.world = 1},
      {.world = 4, .tp = 2, .ep = 2, .etp = 1},                   // EDP = 2
      {.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 1},          // EP spans TP and CP
      {.world = 8, .tp = 2, .ep = 2, .etp = 2},                   // ETP > 1, DP = 4, EDP = 2
      {.world = 8, .tp = 1, .cp = 2, .pp = 2, .ep = 2, .etp = 1},
      {.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 2, .etp = 2},
  };
  for (auto const& config : foldings) {
    auto const fold = FoldedMapping::from(config);
    int const w = fold.world_size();
    std::int64_t const TP = fold.tp(), PP = fold.pp(), ETP = fold.etp(), EP = fold.ep();
    double const D = static_cast<double>(fold.dp() * fold.cp());
    std::vector<RankResult> results(static_cast<std::size_t>(w));
    inproc::run(w, [&](inproc::Communicator& world) {
      auto& out = results[static_cast<std::size_t>(world.rank())];
      try {
        ProcessGroups groups(fold, world);
        auto const a = fold.attention_coord(world.rank());
        auto const m = fold.moe_coord(world.rank());
        std::int64_t const tp = a[Axis::tp], pp = a[Axis::pp];
        std::int64_t const q = groups.dp_cp().rank(), e = groups.edp().rank();
        // dense: global [PP·TP·2, 3], this rank rows (pp·TP + tp)·2 … +2
        Param<double> dense("dense", ParamClass::dense, PP * TP * 2, 3,
                            {{.row0 = (pp * TP + tp) * 2, .rows = 2, .col0 = 0, .cols = 3}});
        // tp-replicated: global [PP, 4], row pp
        Param<double> norm("norm", ParamClass::tp_replicated, PP, 4,
                           {{.row0 = pp, .rows = 1, .col0 = 0, .cols = 4}});
        // expert: global [PP·EP·ETP, 2], row by (pp, ep, etp)
        Param<double> expert("expert", ParamClass::expert, PP * EP * ETP, 2,
                             {{.row0 = (pp * EP + m[Axis::ep]) * ETP + m[Axis::etp], .rows = 1,
                               .col0 = 0, .cols = 2}});
        auto fill = [](Param<double>& p, auto offset) {
          std::size_t i = 0;
          for (auto const& b : p.blocks)
            for (std::int64_t r = 0; r < b.rows; ++r)
              for (std::int64_t c = 0; c < b.cols; ++c, ++i)
                p.grad[i] = base((b.row0 + r) * p.global_cols + b.col0 + c) + offset;
        };
        fill(dense, static_cast<double>(q));
        fill(norm, static_cast<double>(q) + 10.0 * static_cast<double>(tp));
        fill(expert, static_cast<double>(e));
        ParamList<double> params{&dense, &norm, &expert};
        reduce_gradients(test::Exec{}, params, groups);
        out.norm = global_grad_norm(test::Exec{}, params, groups);
        for (auto* p : params) {
          std::size_t i = 0;
          for (auto const& b : p->blocks)
            for (std::int64_t r = 0; r < b.rows; ++r)
              for (std::int64_t c = 0; c < b.cols; ++c, ++i)
                out.grads[{p->name, (b.row0 + r) * p->global_cols + b.col0 + c}] = p->grad[i];
        }
      } catch (std::exception const& ex) {
        out.failure = ex.what();
        throw;
      }
    });
    INFO("world " << w << " tp " << TP << " cp " << fold.cp() << " dp " << fold.dp() << " pp "
                  << PP << " ep " << EP << " etp " << ETP << " edp " << fold.edp());
    // Every replica holds the same reduced value, equal to the formula.
    std::map<std::pair<std::string, std::int64_t>, double> unique;
    for (auto const& r : results) {
      REQUIRE(r.failure.empty());
      for (auto const& [key, g] : r.grads) {
        auto [it, inserted] = unique.emplace(key, g);
        CHECK(std::abs(it->second - g) < 1e-12);
      }
    }
    double sum_sq = 0;
    double const tpd = static_cast<double>(TP), edp = static_cast<double>(fold.edp());
    for (auto const& [key, g] : unique) {
      double const b = base(key.second);
      double expected = 0;
      if (key.first == "dense") expected = b + (D - 1) / 2;
      if (key.first == "norm") expected = tpd * b + tpd * (D - 1) / 2 + 10.0 * tpd * (tpd - 1) / 2;
      if (key.first == "expert") expected = (edp * b + edp * (edp - 1) / 2) / D;
      CHECK(std::abs(g - expected) < 1e-12);
      sum_sq += g * g;
    }
    CHECK(unique.size() == static_cast<std::size_t>(PP * TP * 2 * 3 + PP * 4 + PP * EP * ETP * 2));
    for (auto const& r : results) CHECK(std::abs(r.norm - std::sqrt(sum_sq)) < 1e-12);
  }
}
