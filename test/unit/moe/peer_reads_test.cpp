// The all-to-all dispatcher's peer-read path (rows read from the peers' buffers in place) against
// its collective path on the same routing: every output of dispatch, combine and both backwards
// is bitwise equal (the peer-read path keeps the collective path's summation order), in Megatron
// and dedup modes, dropless and with capacity, on several foldings; ETP > 1 falls back.

#include <cstring>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "moe_test_support.hpp"
#include "support/exec.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"

using namespace moefold;
using moefold::test::expect_clean;
using moefold::test::InprocHarness;
using moefold::test::RankChecks;
using Comm = inproc::Communicator;

namespace {

template <class A, class B>
bool same_bits(A const& a, B const& b) {
  return a.size() == b.size() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

struct Outputs {
  std::vector<std::vector<float>> all;
  std::vector<std::int64_t> tokens_per_expert;
  std::uint64_t bytes = 0;
};

/// plan → dispatch → experts (a nonlinear f_e per row) → combine → both backwards, twice (the
/// second a warm step with buffers given back); every result.
template <class Drop>
Outputs run(bool peer_reads, bool dedup, bool equal, Drop drop, int experts, int topk, std::int64_t h,
            ProcessGroups<Comm>& groups, bool& took_peer_path) {
  int const me = groups.world().rank();
  AllToAllTokenDispatcher<test::Exec, Drop, Comm, float> d(
      {.num_experts = experts, .moe_router_topk = topk, .hidden_size = h, .dedup = dedup,
       .peer_reads = peer_reads},
      drop, groups);
  took_peer_path = d.moves_by_peer_reads();
  Outputs o;
  for (int step = 0; step < 2; ++step) {
    std::int64_t const tokens = equal ? 8 : me % 3 == 2 ? 0 : 5 + 2 * (me % 4) + step;
    auto routing = test::test_routing<float>(me + 7 * step, tokens, experts, topk,
                                             me % 2 ? test::Skew::first_ranks : test::Skew::uniform);
    auto const x = test::tensor<float>("x", me + step, tokens, h);
    auto const g = test::tensor<float>("g", me + step, tokens, h);
    d.plan(routing);
    auto in = d.dispatch(x, routing.probs);
    std::vector<float> y_e(in.expert_input.size()), d_in(in.expert_input.size());
    for (std::size_t i = 0; i < y_e.size(); ++i) {
      float const v = in.expert_input[i];
      y_e[i] = v * v - 0.5f * v + static_cast<float>(i % 7) * 0.125f;
    }
    // Step 0 combines a view (copied), step 1 hands the buffer over (kept without a copy).
    auto y = step == 0 ? d.combine(y_e) : d.combine_owned(Buffer<float>(std::vector<float>(y_e)));
    auto cg = d.combine_backward(g);
    for (std::size_t i = 0; i < d_in.size(); ++i)
      d_in[i] = cg.d_expert_output[i] * (2.f * in.expert_input[i] - 0.5f);
    auto dg = d.dispatch_backward(d_in, cg.d_expert_probs);
    for (auto const* v : {&in.expert_input, &in.expert_probs, &y, &cg.d_expert_output,
                          &cg.d_expert_probs, &dg.d_hidden, &dg.d_probs})
      o.all.emplace_back(v->data(), v->data() + v->size());
    o.tokens_per_expert = in.tokens_per_local_expert;
    o.bytes = static_cast<std::uint64_t>(d.metadata().ep_token_bytes_sent);
    d.give_back(std::move(in.expert_input));
    d.give_back(std::move(y));
  }
  return o;
}

}  // namespace

TEST_CASE("dispatcher peer reads equal the all-to-all path bitwise, forward and backward",
          "[moe][dispatcher][peer_reads]") {
  struct Case {
    FoldingConfig folding;
    int local_experts, topk;
    std::int64_t h;
  };
  for (auto const& c : {Case{{.world = 2, .ep = 2, .etp = 1}, 4, 3, 200},
                        Case{{.world = 4, .tp = 2, .ep = 4, .etp = 1}, 2, 3, 320},
                        Case{{.world = 8, .ep = 8, .etp = 1}, 1, 2, 72},
                        Case{{.world = 4, .tp = 2, .ep = 2, .etp = 2}, 2, 2, 72}}) {
    auto const fold = FoldedMapping::from(c.folding);
    int const experts = c.local_experts * fold.ep();
    INFO("world " << c.folding.world << " ep " << fold.ep() << " etp " << fold.etp());
    expect_clean<InprocHarness>(fold.world_size(), [&](Comm& world, RankChecks& checks) {
      ProcessGroups<Comm> groups(fold, world);
      auto compare = [&](std::string const& mode, auto drop, bool dedup, bool equal) {
        bool peer = false, collective = true;
        auto const a = run(true, dedup, equal, drop, experts, c.topk, c.h, groups, peer);
        auto const b = run(false, dedup, equal, drop, experts, c.topk, c.h, groups, collective);
        auto const where = fmt::format("{} on world rank {}", mode, world.rank());
        checks.check(peer == (fold.etp() == 1) && !collective,
                     where + ": peer reads taken exactly where ETP = 1 and enabled");
        char const* names[] = {"expert_input", "expert_probs", "combine", "d_expert_output",
                               "d_expert_probs", "d_hidden", "d_probs"};
        for (std::size_t i = 0; i < a.all.size(); ++i)
          checks.check(same_bits(a.all[i], b.all[i]),
                       fmt::format("{}: {} (step {}) differs", where, names[i % 7], i / 7));
        checks.check(a.tokens_per_expert == b.tokens_per_expert && a.bytes == b.bytes,
                     where + ": tokens per expert or EP bytes differ");
      };
      compare("megatron dropless", Dropless{}, false, false);
      compare("dedup dropless", Dropless{}, true, false);
      compare("dedup drop=probs", DropByProbs{0.5, false}, true, false);
      compare("megatron drop=position+pad", DropByPosition{0.75, true}, false, true);
    });
  }
}
