// MoELayer with moe_shared_expert_overlap (the shared expert runs while the token all-to-all is in
// flight) against the same layer without it: output, input gradient and every parameter gradient
// bitwise equal, on the peer-read path (EP 2, TP 2) and the collective path with a real
// start → work → wait (EP 2, TP 2, ETP 2); Megatron's validity rules as clear errors.

#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"

using namespace moefold;
using Comm = inproc::Communicator;

namespace {

constexpr std::int64_t kH = 8, kTokens = 6;

MoELayerConfig overlap_config(bool overlap, bool dedup) {
  MoELayerConfig c{.name = "layers.0.mlp", .hidden_size = kH, .moe_ffn_hidden_size = 8,
                   .moe_shared_expert_intermediate_size = 12, .moe_shared_expert_gate = true,
                   .moe_shared_expert_overlap = overlap, .moe_token_dispatcher_dedup = dedup,
                   .seed = 5, .init_std = 0.3};
  c.router.num_experts = 4;
  c.router.moe_router_topk = 2;
  return c;
}

/// y, dx and the parameter gradients of one forward and backward of two microbatches.
std::vector<std::vector<float>> run_layer(bool overlap, bool dedup, ProcessGroups<Comm>& groups,
                                          int rank) {
  DefaultMoELayer<test::Exec, float, Comm> layer(overlap_config(overlap, dedup), groups);
  std::vector<std::vector<float>> out;
  for (int mb = 0; mb < 2; ++mb) {
    std::vector<float> x(kTokens * kH), dy(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = static_cast<float>(std::sin(0.31 * static_cast<double>(i + 97 * rank + 13 * mb)));
      dy[i] = static_cast<float>(std::cos(0.17 * static_cast<double>(i + 41 * rank + 7 * mb)));
    }
    auto const y = layer.forward(x);
    auto const dx = layer.backward(dy);
    out.emplace_back(y.begin(), y.end());
    out.emplace_back(dx.begin(), dx.end());
  }
  for (auto* p : layer.parameters()) out.emplace_back(p->grad.begin(), p->grad.end());
  return out;
}

bool same_bits(std::vector<float> const& a, std::vector<float> const& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

}  // namespace

TEST_CASE("shared-expert overlap gives the non-overlapped layer's results bitwise",
          "[moe][moe_layer][overlap]") {
  for (auto const& folding : {FoldingConfig{.world = 4, .tp = 2, .ep = 2, .etp = 1},
                              FoldingConfig{.world = 4, .tp = 2, .ep = 2, .etp = 2}}) {
    auto const fold = FoldedMapping::from(folding);
    for (bool dedup : {false, true}) {
      std::vector<std::string> failures(4);
      inproc::run(4, [&](Comm& world) {
        ProcessGroups<Comm> groups(fold, world);
        auto const off = run_layer(false, dedup, groups, world.rank());
        auto const on = run_layer(true, dedup, groups, world.rank());
        auto& f = failures[static_cast<std::size_t>(world.rank())];
        if (off.size() != on.size()) f += "different numbers of results; ";
        for (std::size_t i = 0; i < off.size() && i < on.size(); ++i)
          if (!same_bits(off[i], on[i])) f += fmt::format("result {} differs; ", i);
      });
      INFO("etp " << fold.etp() << " dedup " << dedup);
      for (auto const& f : failures) CHECK(f.empty());
    }
  }
}

TEST_CASE("shared-expert overlap is refused without the all-to-all dispatcher or a shared expert",
          "[moe][moe_layer][overlap][errors]") {
  using Catch::Matchers::Contains;
  std::vector<std::string> messages(2);
  auto const fold = FoldedMapping::from({.world = 2, .ep = 2, .etp = 1});
  inproc::run(2, [&](Comm& world) {
    ProcessGroups<Comm> groups(fold, world);
    auto expect = [&](int k, auto&& make) {
      auto const message = test::error_of(make);
      if (world.rank() == 0) messages[static_cast<std::size_t>(k)] = message;
    };
    expect(0, [&] {
      MoELayer<test::Exec, TopKRouter<test::Exec, SoftmaxScore, float>,
               AllGatherDispatcher<Dropless>,
               GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, float>, Comm>
          layer(overlap_config(true, false), groups);
    });
    expect(1, [&] {
      auto c = overlap_config(true, false);
      c.moe_shared_expert_intermediate_size = 0;
      c.moe_shared_expert_gate = false;
      DefaultMoELayer<test::Exec, float, Comm> layer(c, groups);
    });
  });
  CHECK_THAT(messages[0], Contains("moe_shared_expert_overlap needs the all-to-all token "
                                   "dispatcher (Megatron: moe_token_dispatcher_type alltoall or "
                                   "flex); this layer's dispatcher is all-gather"));
  CHECK_THAT(messages[1], Contains("moe_shared_expert_overlap needs a shared expert "
                                   "(moe_shared_expert_intermediate_size > 0, got 0)"));
}
