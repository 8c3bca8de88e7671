// Pipeline schedules as data: Megatron's orders (spec §3), the invariants an executor relies on
// (exhaustively for small sizes), and the bubble measured on the logical clock.

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/pipeline/pipeline_schedule.hpp"
#include "moefold/pipeline/simulation.hpp"
#include "support/catch.hpp"

using namespace moefold;

static_assert(PipelineSchedule<OneFOneB>);
static_assert(PipelineSchedule<Interleaved>);

namespace {

template <PipelineSchedule S>
std::string ops(S const& s, int stage) {
  std::string out;
  for (auto const& a : s.compute_order(stage)) {
    if (!out.empty()) out += ' ';
    out += to_string(a, s.num_chunks() > 1);
  }
  return out;
}

/// Every 1F1B schedule with PP ≤ 5, M ≤ 9 and every valid interleaved one with PP ≤ 4, N ≤ 3,
/// M ≤ 9 and any group size.
std::vector<OneFOneB> small_one_f_one_b() {
  std::vector<OneFOneB> out;
  for (int p = 1; p <= 5; ++p)
    for (int m = 1; m <= 9; ++m) out.push_back({.stages = p, .microbatches = m});
  return out;
}
std::vector<Interleaved> small_interleaved() {
  std::vector<Interleaved> out;
  for (int p = 2; p <= 4; ++p)
    for (int n = 2; n <= 3; ++n)
      for (int m = 1; m <= 9; ++m)
        for (int g = p; g <= m; ++g) {
          if (m % g != 0 && m % g < p) continue;
          out.push_back(
              {.stages = p, .virtual_stages = n, .microbatches = m, .microbatch_group_size = g});
        }
  return out;
}

bool is_send(PipelineAction const& a) {
  return a.op == PipelineOp::send_forward || a.op == PipelineOp::send_backward;
}

/// The invariants of one schedule, checked on its data alone (no simulation).
template <PipelineSchedule S>
void check_invariants(S const& s) {
  int const p = s.num_stages(), n = s.num_chunks(), m = s.num_microbatches();
  auto vstage = [&](int stage, int chunk) { return chunk * p + stage; };
  // Channel (src, dst, forward?) -> the tensors (microbatch, producing virtual stage) in order.
  std::map<std::tuple<int, int, bool>, std::vector<std::pair<int, int>>> sent, received;
  for (int stage = 0; stage < p; ++stage) {
    auto const list = s.actions(stage);
    // Each (microbatch, chunk) runs its forward once, then its backward once.
    std::map<std::pair<int, int>, int> f_at, b_at;
    std::vector<int> fifo_f(static_cast<std::size_t>(n), 0), fifo_b(static_cast<std::size_t>(n), 0);
    int in_flight = 0, max_in_flight = 0;
    for (int i = 0; i < static_cast<int>(list.size()); ++i) {
      auto const& a = list[static_cast<std::size_t>(i)];
      auto const key = std::pair{a.microbatch, a.chunk};
      REQUIRE(a.chunk >= 0);
      REQUIRE(a.chunk < n);
      REQUIRE(a.microbatch >= 0);
      REQUIRE(a.microbatch < m);
      if (a.op == PipelineOp::forward) {
        REQUIRE(f_at.count(key) == 0);
        f_at[key] = i;
        max_in_flight = std::max(max_in_flight, ++in_flight);
        // Microbatches enter each chunk in order, and leave it (backward) in the same order.
        CHECK(a.microbatch == fifo_f[static_cast<std::size_t>(a.chunk)]++);
      } else if (a.op == PipelineOp::backward) {
        REQUIRE(f_at.count(key) == 1);
        REQUIRE(b_at.count(key) == 0);
        b_at[key] = i;
        --in_flight;
        CHECK(a.microbatch == fifo_b[static_cast<std::size_t>(a.chunk)]++);
      } else {
        int const here = vstage(stage, a.chunk);
        bool const fwd = a.is_forward_direction();
        bool const send = is_send(a);
        // The peer is the neighbouring stage on the ring, in the direction of travel.
        int const towards = (send == fwd) ? (stage + 1) % p : (stage + p - 1) % p;
        CHECK(a.peer == towards);
        CHECK(a.peer != stage);
        auto const channel = send ? std::tuple{stage, a.peer, fwd} : std::tuple{a.peer, stage, fwd};
        int const producer = send ? here : (fwd ? here - 1 : here + 1);
        (send ? sent : received)[channel].push_back({a.microbatch, producer});
        // A send follows the computation that produced it; a receive precedes its consumer.
        auto const& done = fwd ? f_at : b_at;
        if (send) CHECK(done.count(key) == 1);
        if (!send) CHECK(done.count(key) == 0);
      }
    }
    REQUIRE(f_at.size() == static_cast<std::size_t>(m * n));
    REQUIRE(b_at.size() == static_cast<std::size_t>(m * n));
    // At most W + 1 microbatch-chunks hold activations at once (all of them if all is warm-up).
    CHECK(max_in_flight == std::min(s.warmup(stage) + 1, m * n));
    // Each computation that needs an input receives it exactly once, and each output not
    // leaving the pipeline is sent exactly once.
    for (auto const& a : list) {
      if (!a.is_compute()) continue;
      bool const fwd = a.op == PipelineOp::forward;
      int const v = vstage(stage, a.chunk);
      bool const needs_input = fwd ? v != 0 : v != p * n - 1;
      bool const has_output = fwd ? v != p * n - 1 : v != 0;
      auto count = [&](PipelineOp op) {
        return std::count_if(list.begin(), list.end(), [&](PipelineAction const& b) {
          return b.op == op && b.microbatch == a.microbatch && b.chunk == a.chunk;
        });
      };
      CHECK(count(fwd ? PipelineOp::recv_forward : PipelineOp::recv_backward) == needs_input);
      CHECK(count(fwd ? PipelineOp::send_forward : PipelineOp::send_backward) == has_output);
    }
  }
  // The k-th receive on every channel gets what the k-th send sent.
  CHECK(sent == received);
}

/// The simulated timeline honours every cross-stage dependency.
template <PipelineSchedule S>
void check_timeline(S const& s, PipelineTimeline const& tl) {
  int const p = s.num_stages(), n = s.num_chunks();
  std::map<std::tuple<bool, int, int>, TimedAction> at;  // (forward?, mb, virtual stage)
  for (int stage = 0; stage < p; ++stage)
    for (auto const& t : tl.stages[static_cast<std::size_t>(stage)])
      at[{t.action.op == PipelineOp::forward, t.action.microbatch, t.action.chunk * p + stage}] = t;
  for (auto const& [key, t] : at) {
    auto const [fwd, mb, v] = key;
    if (fwd && v > 0) CHECK(t.start >= at.at({true, mb, v - 1}).end);
    if (!fwd && v < p * n - 1) CHECK(t.start >= at.at({false, mb, v + 1}).end);
    if (!fwd && v == p * n - 1) CHECK(t.start >= at.at({true, mb, v}).end);
  }
}

}  // namespace

TEST_CASE("1F1B reproduces the spec's worked example, PP=4, M=8") {
  OneFOneB const s{.stages = 4, .microbatches = 8};
  CHECK(s.warmup(0) == 3);
  CHECK(ops(s, 0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7");
  CHECK(s.warmup(3) == 0);
  CHECK(ops(s, 3) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7");
}

TEST_CASE("1F1B warm-up is min(PP - rank - 1, M)") {
  OneFOneB const s{.stages = 6, .microbatches = 3};
  for (int r = 0; r < 6; ++r) CHECK(s.warmup(r) == std::min(6 - r - 1, 3));
  CHECK(ops(s, 0) == "F0 F1 F2 B0 B1 B2");  // all warm-up
}

TEST_CASE("1F1B with one stage is forward then backward per microbatch, without communication") {
  OneFOneB const s{.stages = 1, .microbatches = 3};
  CHECK(s.warmup(0) == 0);
  CHECK(ops(s, 0) == "F0 B0 F1 B1 F2 B2");
  auto const list = s.actions(0);
  CHECK(std::all_of(list.begin(), list.end(), [](auto const& a) { return a.is_compute(); }));
}

TEST_CASE("1F1B places Megatron's communication: steady-state send+receive pairs form one batch") {
  OneFOneB const s{.stages = 3, .microbatches = 4};
  std::string text;
  for (auto const& a : s.actions(1)) text += to_string(a, false) + "; ";
  CHECK(text ==
        "recv_forward F0 <- 0; F0; send_forward F0 -> 2; recv_forward F1 <- 0; F1; "
        "send_forward F1 -> 2; recv_backward B0 <- 2; B0; send_backward B0 -> 0; "
        "recv_forward F2 <- 0; F2; send_forward F2 -> 2; recv_backward B1 <- 2; B1; "
        "send_backward B1 -> 0; recv_forward F3 <- 0; F3; send_forward F3 -> 2; "
        "recv_backward B2 <- 2; B2; send_backward B2 -> 0; recv_backward B3 <- 2; B3; "
        "send_backward B3 -> 0; ");
}

TEST_CASE("interleaved reproduces the spec's worked example, PP=4, N=2, M=8, rank 0") {
  Interleaved const s{.stages = 4, .virtual_stages = 2, .microbatches = 8};
  CHECK(s.group_size() == 4);
  CHECK(s.warmup(0) == 10);
  CHECK(ops(s, 0) ==
        "F0c0 F1c0 F2c0 F3c0 F0c1 F1c1 F2c1 F3c1 F4c0 F5c0 F6c0 "
        "B0c1 F7c0 B1c1 F4c1 B2c1 F5c1 B3c1 F6c1 B0c0 F7c1 B1c0 B2c0 B3c0 B4c1 B5c1 B6c1 B7c1 "
        "B4c0 B5c0 B6c0 B7c0");
  for (int r = 0; r < 4; ++r) CHECK(s.warmup(r) == 2 * (4 - r - 1) + 4);
}

TEST_CASE("interleaved schedule table follows the group size, the last group takes the rest") {
  Interleaved const s{
      .stages = 2, .virtual_stages = 2, .microbatches = 5, .microbatch_group_size = 3};
  std::string text;
  for (auto const& a : s.table()) text += to_string(a, true) + " ";
  // Groups {0,1,2} then {3,4} (5 mod 3 = 2 ≥ PP).
  CHECK(text == "F0c0 F1c0 F2c0 F0c1 F1c1 F2c1 F3c0 F4c0 F3c1 F4c1 ");
  CHECK(s.warmup(0) == 2 + 3);
  CHECK(s.warmup(1) == 3);
}

TEST_CASE("interleaved warm-up is clipped at M·N, and then everything is warm-up") {
  Interleaved const s{.stages = 4, .virtual_stages = 2, .microbatches = 4};
  CHECK(s.warmup(0) == 8);  // 2·3 + 4 = 10 > 8
  CHECK(ops(s, 0) ==
        "F0c0 F1c0 F2c0 F3c0 F0c1 F1c1 F2c1 F3c1 B0c1 B1c1 B2c1 B3c1 B0c0 B1c0 B2c0 B3c0");
}

TEST_CASE("invalid schedules are rejected naming the rule and the numbers") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH((OneFOneB{.stages = 0, .microbatches = 4}.actions(0)),
                    Contains("PP ≥ 1 (PP = 0)"));
  CHECK_THROWS_WITH((OneFOneB{.stages = 2, .microbatches = 0}.validate()),
                    Contains("M ≥ 1 (M = 0)"));
  CHECK_THROWS_AS((OneFOneB{.stages = 2, .microbatches = 0}.validate()), invalid_config);
  CHECK_THROWS_WITH((Interleaved{.stages = 1, .virtual_stages = 2, .microbatches = 4}.validate()),
                    Contains("PP ≥ 2 (PP = 1)"));
  CHECK_THROWS_WITH((Interleaved{.stages = 2, .virtual_stages = 1, .microbatches = 4}.validate()),
                    Contains("N ≥ 2 (N = 1)"));
  CHECK_THROWS_WITH(
      (Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 8, .microbatch_group_size = 3}
           .validate()),
      Contains("Gm = 3 must be at least the pipeline stages PP = 4"));
  CHECK_THROWS_WITH(
      (Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 6, .microbatch_group_size = 8}
           .validate()),
      Contains("Gm = 8 must not exceed the number of microbatches M = 6"));
  CHECK_THROWS_WITH(
      (Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 10}.validate()),
      Contains("M mod Gm = 2 < PP = 4 (default Gm = PP: M must be a multiple of PP)"));
  CHECK_THROWS_AS((Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 10}.actions(0)),
                  invalid_config);
  CHECK_THROWS_AS((OneFOneB{.stages = 2, .microbatches = 2}.actions(2)), error);
}

TEST_CASE("every small 1F1B schedule keeps the executor's invariants") {
  for (auto const& s : small_one_f_one_b()) {
    INFO("PP " << s.stages << " M " << s.microbatches);
    check_invariants(s);
  }
}

TEST_CASE("every small interleaved schedule keeps the executor's invariants") {
  for (auto const& s : small_interleaved()) {
    INFO("PP " << s.stages << " N " << s.virtual_stages << " M " << s.microbatches << " Gm "
               << s.group_size());
    check_invariants(s);
  }
}

TEST_CASE("schedules run to the end with blocking sends, and honour every dependency") {
  for (auto mode : {SendMode::eager, SendMode::rendezvous}) {
    for (auto const& s : small_one_f_one_b()) {
      INFO("PP " << s.stages << " M " << s.microbatches);
      check_timeline(s, simulate(s, {}, mode));
    }
    for (auto const& s : small_interleaved()) {
      INFO("PP " << s.stages << " N " << s.virtual_stages << " M " << s.microbatches);
      check_timeline(s, simulate(s, {}, mode));
    }
  }
}

TEST_CASE("the simulator reports a deadlock and a mismatched receive") {
  using Catch::Matchers::Contains;
  // Both stages receive first: neither ever sends.
  std::vector<std::vector<PipelineAction>> deadlock{
      {{PipelineOp::recv_backward, 0, 0, 1}, {PipelineOp::forward, 0, 0, -1}},
      {{PipelineOp::recv_forward, 0, 0, 0}, {PipelineOp::forward, 0, 0, -1}}};
  CHECK_THROWS_WITH(detail::simulate_lists(deadlock, 1, {}, SendMode::eager),
                    Contains("deadlocks"));
  std::vector<std::vector<PipelineAction>> mismatch{
      {{PipelineOp::forward, 0, 0, -1}, {PipelineOp::send_forward, 0, 0, 1}},
      {{PipelineOp::recv_forward, 1, 0, 0}, {PipelineOp::forward, 1, 0, -1}}};
  CHECK_THROWS_WITH(detail::simulate_lists(mismatch, 1, {}, SendMode::eager),
                    Contains("got the tensor of microbatch 0"));
}

TEST_CASE("1F1B's simulated bubble is exactly (p-1)/(m+p-1)") {
  for (int p = 1; p <= 8; ++p)
    for (int m = 1; m <= 16; ++m) {
      OneFOneB const s{.stages = p, .microbatches = m};
      for (auto mode : {SendMode::eager, SendMode::rendezvous}) {
        auto const tl = simulate(s, {}, mode);
        INFO("PP " << p << " M " << m);
        // total idle / (p · makespan) == (p − 1) / (m + p − 1), in integers.
        CHECK(static_cast<long>(tl.total_idle()) * (m + p - 1) ==
              static_cast<long>(p - 1) * p * tl.makespan);
        CHECK(tl.makespan == 3 * (m + p - 1));
        for (int r = 0; r < p; ++r) CHECK(tl.busy[static_cast<std::size_t>(r)] == 3 * m);
      }
      CHECK(simulate(s).idle_fraction() == Approx(s.ideal_bubble_fraction()));
    }
}

TEST_CASE("interleaved's simulated bubble equals the ideal (p-1)/(v·m+p-1) for valid schedules") {
  // docs/pipeline.md explains why: unit costs leave no dependency gap once the warm-up has
  // 2·(PP−rank−1) + (N−1)·Gm forwards; other costs keep the same makespan (F+B)·(v·m+p−1).
  for (auto costs : {PipelineCosts{1, 2}, PipelineCosts{1, 1}, PipelineCosts{2, 3}})
    for (auto const& s : small_interleaved()) {
      long const p = s.stages, v = s.virtual_stages, m = s.microbatches;
      auto const tl = simulate(s, costs, SendMode::rendezvous);
      INFO("PP " << p << " N " << v << " M " << m << " Gm " << s.group_size());
      CHECK(tl.makespan == (costs.forward + costs.backward) * (v * m + p - 1));
      CHECK(tl.total_idle() * (v * m + p - 1) == (p - 1) * p * tl.makespan);
    }
  Interleaved const s{.stages = 4, .virtual_stages = 2, .microbatches = 8};
  CHECK(simulate(s).idle_fraction() == Approx(3.0 / 19.0));
  CHECK(s.ideal_bubble_fraction() == Approx(3.0 / 19.0));
  CHECK(simulate(OneFOneB{.stages = 4, .microbatches = 8}).idle_fraction() == Approx(3.0 / 11.0));
}
