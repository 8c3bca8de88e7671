// Where a device run meets the host (issue "one layer code for host and device", deliverable
// 5): the router, the token dropping and both dispatchers run on `SimulatedDevice`, whose memory
// the type system treats as a device's and whose copies to the host are counted. One MoE
// forward (router, plan, dispatch, experts, combine) copies exactly one buffer of counts to the
// host — the plan's — and the backward none; the outputs and gradients equal the `Cpu`
// instance's bit for bit (the same bodies, the same order of every sum).

#include <cstdint>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "moe_test_support.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/exec/simulated_device.hpp"
#include "moefold/moe/all_gather_dispatcher.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/router.hpp"
#include "moefold/ops/row_scale.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::expect_clean;
using moefold::test::InprocHarness;
using moefold::test::RankChecks;
using Comm = inproc::Communicator;
using Dev = SimulatedDevice;
using DevSpace = SimulatedDeviceSpace;

namespace {

constexpr std::int64_t kTokens = 24, kHidden = 5;
constexpr int kExperts = 6, kTopK = 2;

template <class T>
Buffer<T, DevSpace> to_device(Dev const& dev, std::vector<T> const& v) {
  auto b = dev.allocate<T>(static_cast<std::int64_t>(v.size()));
  copy<T>(dev, View<T const>(v), b.view());
  return b;
}
template <class T>
std::vector<T> to_host(Dev const& dev, Buffer<T, DevSpace> const& b) {
  std::vector<T> v(b.size());
  copy<T>(dev, b.view(), View<T>(v));
  return v;
}

/// What one forward and backward produced, in host memory.
struct Results {
  std::vector<float> y, dx, d_probs, weight_grad;
  std::vector<std::int64_t> tokens_per_local_expert, input_splits, local_tokens_per_expert;
};

/// The experts: row n of local expert l is scaled by (l + 1) (rows are grouped by expert).
std::vector<float> expert_scales(std::vector<std::int64_t> const& tokens_per_local_expert) {
  std::vector<float> w;
  for (std::size_t l = 0; l < tokens_per_local_expert.size(); ++l)
    w.insert(w.end(), static_cast<std::size_t>(tokens_per_local_expert[l]),
             static_cast<float>(l + 1));
  return w;
}

/// Router → plan → dispatch → experts → combine, and back, on instance `exec`. `forward_copies`
/// and `backward_copies` receive the device → host copies of each direction (−1 on the host).
template <class Exec, class Dispatcher>
Results run(Exec const& exec, Dispatcher& d, TopKRouter<Exec, SoftmaxScore, float>& router,
            std::vector<float> const& x_host, std::vector<float> const& g_host,
            std::int64_t& forward_copies, std::int64_t& forward_bytes,
            std::int64_t& backward_copies) {
  using Space = typename Exec::memory_space;
  auto up = [&](std::vector<float> const& v) {
    auto b = exec.template allocate<float>(static_cast<std::int64_t>(v.size()));
    copy<float>(exec, View<float const>(v), b.view());
    return b;
  };
  auto down = [&](auto const& b) {
    using U = typename std::remove_cvref_t<decltype(b)>::value_type;
    std::vector<U> v(b.size());
    copy<U>(exec, b.view(), View<U>(v));
    return v;
  };
  auto const x = up(x_host);
  auto const g = up(g_host);
  ops::fill(exec, router.weight_grad(), 0.0f);
  auto traffic = [&]() -> std::pair<std::int64_t, std::int64_t> {
    if constexpr (std::is_same_v<Exec, Dev>)
      return {exec.traffic().to_host.calls, exec.traffic().to_host.bytes};
    else
      return {-1, -1};
  };

  // Forward. The experts' per-row scales come from host metadata (tokens per local expert) and
  // go to the device: a host → device copy, as a real experts GEMM would take its counts.
  auto const [c0, b0] = traffic();
  auto out = router.forward(View<float const, Space>(x.view()), kTokens);
  auto const& meta = d.plan(out.routing);
  auto in = d.dispatch(x.view(), out.routing.probs.view());
  auto const w = up(expert_scales(in.tokens_per_local_expert));
  auto y_e = exec.template allocate<float>(static_cast<std::int64_t>(in.expert_input.size()));
  auto const rows = static_cast<std::int64_t>(w.size());
  ops::scale_rows<Exec, float>(exec, View<float const, Space>(in.expert_input.view(rows, kHidden)),
                               w.view(), y_e.view());
  auto const y = d.combine(y_e.view());
  auto const [c1, b1] = traffic();

  // Backward.
  auto cg = d.combine_backward(g.view());
  auto d_in = exec.template allocate<float>(static_cast<std::int64_t>(cg.d_expert_output.size()));
  ops::scale_rows<Exec, float>(exec, View<float const, Space>(cg.d_expert_output.view(rows, kHidden)),
                               w.view(), d_in.view());
  auto dg = d.dispatch_backward(d_in.view(), cg.d_expert_probs.view());
  auto const dx = router.backward(dg.d_probs.view());
  auto const [c2, b2] = traffic();
  forward_copies = c1 - c0;
  forward_bytes = b1 - b0;
  backward_copies = c2 - c1;

  Results r;
  r.y = down(y);
  r.dx = down(dg.d_hidden);
  auto const dxr = down(dx);
  for (std::size_t i = 0; i < r.dx.size(); ++i) r.dx[i] += dxr[i];
  r.d_probs = down(dg.d_probs);
  std::vector<float> wg(router.weight_grad().size());
  copy<float>(exec, View<float const, Space>(router.weight_grad()), View<float>(wg));
  r.weight_grad = wg;
  r.tokens_per_local_expert = meta.tokens_per_local_expert;
  r.input_splits = meta.input_splits;
  r.local_tokens_per_expert = meta.local_tokens_per_expert;
  return r;
}

struct Mode {
  bool all_gather;
  bool dedup;
  int drop;  // 0 dropless, 1 probs, 2 position
  bool pad;
  std::string name() const {
    return fmt::format("{}{} drop={}{}", all_gather ? "all_gather" : "all_to_all",
                       dedup ? "+dedup" : "", drop, pad ? "+pad" : "");
  }
};

template <class Drop>
void check_mode(Mode const& mode, Drop drop, RouterConfig const& rc, int aux_types,
                ProcessGroups<Comm>& groups, RankChecks& checks) {
  DispatcherConfig const cfg{.num_experts = kExperts,
                             .moe_router_topk = kTopK,
                             .hidden_size = kHidden,
                             .dedup = mode.dedup};
  auto const x = test::tensor<float>("x", 0, kTokens, kHidden);
  auto const g = test::tensor<float>("g", 0, kTokens, kHidden);
  Dev dev;
  TopKRouter<Cpu, SoftmaxScore, float> host_router(rc, kHidden);
  host_router.weight_param().init(7, InitDist::normal, 0.5);
  TopKRouter<Dev, SoftmaxScore, float> dev_router(dev, rc, kHidden);
  copy<float>(dev, View<float const>(host_router.weight_param().value), dev_router.weight());

  auto run_both = [&](auto& host_d, auto& dev_d) {
    std::int64_t hc = 0, hb = 0, hbc = 0, fc = 0, fb = 0, bc = 0;
    auto const want = run(Cpu{}, host_d, host_router, x, g, hc, hb, hbc);
    auto const got = run(dev, dev_d, dev_router, x, g, fc, fb, bc);
    auto const where = mode.name();
    checks.check(got.y == want.y, where + ": output differs from the Cpu instance's");
    checks.check(got.dx == want.dx, where + ": input gradient differs from the Cpu instance's");
    checks.check(got.d_probs == want.d_probs, where + ": d probs differ from the Cpu instance's");
    checks.check(got.weight_grad == want.weight_grad,
                 where + ": router weight gradient differs from the Cpu instance's");
    checks.check(got.tokens_per_local_expert == want.tokens_per_local_expert &&
                     got.input_splits == want.input_splits &&
                     got.local_tokens_per_expert == want.local_tokens_per_expert,
                 where + ": metadata differs from the Cpu instance's");
    // The plan's one buffer: [E | EP (dedup) or L (all-gather) | status], int64. The router's
    // statistics of each load-balancing loss add two copies (counts and column sums).
    // (Padding turns dedup off.)
    bool const dedup = mode.dedup && !mode.pad;
    std::int64_t const words = kExperts + (mode.all_gather ? kExperts : (dedup ? 1 : 0)) + 1;
    checks.equal(fc, std::int64_t{1 + 2 * aux_types}, where + ": device → host copies of a forward");
    checks.equal(fb, static_cast<std::int64_t>(words * 8 + aux_types * kExperts * (8 + 4)),
                 where + ": device → host bytes of a forward");
    checks.equal(bc, std::int64_t{0}, where + ": device → host copies of a backward");
  };
  if (mode.all_gather) {
    AllGatherTokenDispatcher<Cpu, Drop, Comm, float> h(cfg, drop, groups);
    AllGatherTokenDispatcher<Dev, Drop, Comm, float> dv(dev, cfg, drop, groups);
    run_both(h, dv);
  } else {
    AllToAllTokenDispatcher<Cpu, Drop, Comm, float> h(cfg, drop, groups);
    AllToAllTokenDispatcher<Dev, Drop, Comm, float> dv(dev, cfg, drop, groups);
    run_both(h, dv);
    run_both(h, dv);  // a second plan through the same dispatchers
  }
}

RouterConfig router_config(bool aux) {
  RouterConfig rc;
  rc.num_experts = kExperts;
  rc.moe_router_topk = kTopK;
  if (aux) {
    rc.moe_router_load_balancing_type = {LoadBalancingType::aux_loss};
    rc.moe_aux_loss_coeff = {0.01};
  } else {
    rc.moe_router_load_balancing_type = {LoadBalancingType::none};
    rc.moe_aux_loss_coeff = {0.0};
  }
  return rc;
}

}  // namespace

TEST_CASE(
    "on a device, routing, token dropping and the dispatchers' row maps stay in device memory: "
    "one copy of counts per forward, none per backward, results equal to the Cpu instance's",
    "[moe][dispatcher][device]") {
  std::vector<Mode> const modes{
      {false, false, 0, false}, {false, true, 0, false}, {false, true, 1, false},
      {false, false, 2, false}, {false, false, 1, true}, {false, true, 2, true},
      {true, false, 0, false},  {true, false, 1, true},  {true, false, 2, false},
  };
  for (bool const aux : {false, true})
    for (auto const& mode : modes) {
      INFO(mode.name() << (aux ? " with aux loss" : ""));
      expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
        ProcessGroups<Comm> groups(FoldedMapping::from({.world = 1}), world);
        auto const rc = router_config(aux);
        int const aux_types = aux ? 1 : 0;
        // Capacity factor 0.5 drops; with padding, 1.0 leaves fillers.
        double const cf = mode.pad ? 1.0 : 0.5;
        if (mode.drop == 0)
          check_mode(mode, Dropless{}, rc, aux_types, groups, checks);
        else if (mode.drop == 1)
          check_mode(mode, DropByProbs{cf, mode.pad}, rc, aux_types, groups, checks);
        else
          check_mode(mode, DropByPosition{cf, mode.pad}, rc, aux_types, groups, checks);
      });
    }
}

TEST_CASE("on a device, a NaN logit is reported by the plan's one copy, naming the token",
          "[moe][dispatcher][device][errors]") {
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    ProcessGroups<Comm> groups(FoldedMapping::from({.world = 1}), world);
    Dev dev;
    auto const rc = router_config(false);
    TopKRouter<Dev, SoftmaxScore, float> router(dev, rc, kHidden);
    ops::fill(dev, router.weight(), 0.25f);
    auto x = test::tensor<float>("x", 0, kTokens, kHidden);
    x[static_cast<std::size_t>(7 * kHidden + 2)] = NAN;  // token 7
    auto const xd = to_device(dev, x);
    AllToAllTokenDispatcher<Dev, Dropless, Comm, float> d(
        dev, DispatcherConfig{.num_experts = kExperts, .moe_router_topk = kTopK, .hidden_size = kHidden},
        Dropless{}, groups);
    auto out = router.forward(View<float const, DevSpace>(xd.view()), kTokens);
    auto const msg = test::error_of([&] { d.plan(out.routing); });
    checks.check(msg.find("logit of token 7 for expert 0 is NaN or infinite") != std::string::npos,
                 "message: " + msg);
  });
}

TEST_CASE("device memory does not cross ranks through a host communicator: a clear error",
          "[moe][dispatcher][device][errors]") {
  expect_clean<InprocHarness>(2, [&](Comm& world, RankChecks& checks) {
    auto const fold = FoldedMapping::from({.world = 2, .ep = 2, .etp = 1});
    ProcessGroups<Comm> groups(fold, world);
    Dev dev;
    AllToAllTokenDispatcher<Dev, Dropless, Comm, float> d(
        dev, DispatcherConfig{.num_experts = 4, .moe_router_topk = 1, .hidden_size = kHidden},
        Dropless{}, groups);
    auto host = test::test_routing<float>(world.rank(), 4, 4, 1, test::Skew::uniform);
    Routing<float, DevSpace> r;
    r.num_tokens = host.num_tokens;
    r.num_experts = host.num_experts;
    r.map = to_device(dev, host.map.vector());
    r.probs = to_device(dev, host.probs.vector());
    d.plan(r);
    auto const x = to_device(dev, test::tensor<float>("x", world.rank(), 4, kHidden));
    auto const msg = test::error_of([&] { d.dispatch(x.view(), r.probs.view()); });
    checks.check(msg.find("device memory crosses ranks only through a device communicator") !=
                     std::string::npos,
                 "message: " + msg);
  });
}
