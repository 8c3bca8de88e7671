// Fuzz target: AllToAllTokenDispatcher::plan (then dispatch and combine) on an in-process world
// of 1, 2 or 4 ranks, each rank's Routing built from the input bytes: arbitrary shapes, map
// entries and probabilities, and every drop policy. Invalid input must throw moefold::error.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include <fuzzer/FuzzedDataProvider.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"

namespace {

using Comm = moefold::inproc::Communicator;

struct Case {
  moefold::FoldingConfig folding;
  moefold::DispatcherConfig cfg;
  int policy = 0;  // 0 dropless, 1 by probs, 2 by position
  double capacity_factor = 1.0;
  bool pad = false;
  std::vector<moefold::Routing<float>> routing;  // one per rank
};

moefold::Routing<float> routing_from(FuzzedDataProvider& in, int experts) {
  moefold::Routing<float> r;
  r.num_tokens = in.ConsumeIntegralInRange<std::int64_t>(0, 16);
  r.num_experts = experts;
  if (in.ConsumeProbability<float>() < 0.05f) {  // a shape that lies about its entries
    r.num_tokens = in.ConsumeIntegral<std::int64_t>();
    r.num_experts = in.ConsumeIntegral<std::int64_t>();
  }
  auto const n = in.ConsumeIntegralInRange<std::size_t>(0, 16 * 16);
  for (std::size_t i = 0; i < n && in.remaining_bytes() > 0; ++i) {
    auto const route = in.ConsumeIntegralInRange<int>(0, 3);  // 3: not a Route value
    r.map.push_back(static_cast<moefold::Route>(route));
    r.probs.push_back(route == 0 ? 0.0f : in.ConsumeFloatingPoint<float>());
  }
  if (in.ConsumeBool()) {  // make the shape consistent most of the time
    r.num_tokens = std::clamp<std::int64_t>(r.num_tokens, 0, 16);  // also a lying shape's
    r.map.resize(static_cast<std::size_t>(r.num_tokens * experts), moefold::Route::none);
    r.probs.resize(r.map.size(), 0.0f);
    r.num_experts = experts;
  }
  return r;
}

template <class Drop>
void run_rank(Case const& c, Drop drop, Comm& world) {
  moefold::ProcessGroups<Comm> groups(moefold::FoldedMapping::from(c.folding), world);
  moefold::AllToAllTokenDispatcher<moefold::Cpu, Drop, Comm, float> d(c.cfg, drop, groups);
  auto const& routing = c.routing[static_cast<std::size_t>(world.rank())];
  auto const& meta = d.plan(routing);
  auto const h = static_cast<std::size_t>(c.cfg.hidden_size);
  std::vector<float> hidden(static_cast<std::size_t>(routing.num_tokens) * h, 1.0f);
  auto out = d.dispatch(hidden, routing.probs);
  if (static_cast<std::int64_t>(out.expert_input.size()) != meta.num_expert_rows() * c.cfg.hidden_size)
    std::abort();
  (void)d.combine(out.expert_input);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  Case c;
  int const world = 1 << in.ConsumeIntegralInRange<int>(0, 2);
  int const etp = in.ConsumeBool() && world > 1 ? 2 : 1;
  c.folding = {.world = world, .ep = world / etp, .etp = etp};
  c.cfg.num_experts = in.ConsumeIntegralInRange<int>(0, 9);
  c.cfg.moe_router_topk = in.ConsumeIntegralInRange<int>(0, 3);
  c.cfg.hidden_size = in.ConsumeIntegralInRange<int>(0, 3);
  c.cfg.dedup = in.ConsumeBool();
  c.policy = in.ConsumeIntegralInRange<int>(0, 2);
  c.capacity_factor = in.ConsumeFloatingPointInRange<double>(-1.0, 4.0);
  c.pad = in.ConsumeBool();
  for (int r = 0; r < world; ++r) c.routing.push_back(routing_from(in, c.cfg.num_experts));
  try {
    moefold::inproc::run(world, [&](Comm& comm) {
      if (c.policy == 0)
        run_rank(c, moefold::Dropless{}, comm);
      else if (c.policy == 1)
        run_rank(c, moefold::DropByProbs{c.capacity_factor, c.pad}, comm);
      else
        run_rank(c, moefold::DropByPosition{c.capacity_factor, c.pad}, comm);
    });
  } catch (moefold::error const&) {
  }
  return 0;
}
