// The MoE training semantics of whole steps, through DecoderStage + run_pipeline +
// finalize_model_grads, with every auxiliary loss on: under foldings with PP 2, VPP 2 (so the
// stage recomputes), CP 2, TP 2, DP 2 and EP spanning TP and CP, three SGD steps give the losses,
// the reduced router gradients and the expert biases of the 1-rank run; statistics are counted
// once per microbatch (never on a recompute or an evaluation forward); per-token-loss mode trains
// like the default mode on unmasked data.

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/core/init.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/nn/sequence_shard.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/train/decoder_stage.hpp"
#include "moefold/train/finalize_model_grads.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Comm = inproc::Communicator;
using Moe = MoELayer<test::Exec, TopKRouter<test::Exec, ConfiguredScore, float>, AllToAllDispatcher<Dropless>,
                     GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, float>, Comm>;
using Stage = DecoderStage<test::Exec, float, Comm, Moe>;

namespace {

constexpr std::int64_t kSeq = 16, kBatch = 2, kVocab = 64, kHidden = 16, kLayers = 4;
constexpr int kGlobalBatch = 8, kTopK = 2;
constexpr double kLr = 0.05;

/// Which auxiliary machinery a run turns on.
struct Losses {
  ScoreFunction score = ScoreFunction::softmax;
  std::vector<LoadBalancingType> types;
  std::vector<double> coeffs = {0.0};
  std::optional<double> z_loss;
  bool expert_bias = false;
  bool per_token = false;
};

/// Every auxiliary loss of the softmax router (the global one needs DP 1 to equal the 1-rank
/// run: Megatron reduces its counts over tp_dp_cp, so its value depends on DP).
Losses all_losses(bool with_global = true) {
  Losses l{.types = {LoadBalancingType::aux_loss, LoadBalancingType::seq_aux_loss},
           .coeffs = {0.1, 0.2},
           .z_loss = 0.01};
  if (with_global) {
    l.types.push_back(LoadBalancingType::global_aux_loss);
    l.coeffs.push_back(0.3);
  }
  return l;
}
/// Aux-loss-free balancing: sigmoid scores and the expert bias (and an aux loss on top).
Losses expert_bias() {
  return {.score = ScoreFunction::sigmoid,
          .types = {LoadBalancingType::aux_loss},
          .coeffs = {0.05},
          .z_loss = std::nullopt,
          .expert_bias = true};
}

MoELayerConfig moe_config(Losses const& l) {
  MoELayerConfig c{.hidden_size = kHidden, .moe_ffn_hidden_size = 16, .seed = 5, .init_std = 0.3};
  c.router.num_experts = 8;
  c.router.moe_router_topk = kTopK;
  c.router.moe_router_score_function = l.score;
  c.router.moe_router_load_balancing_type =
      l.types.empty() ? std::vector{LoadBalancingType::none} : l.types;
  c.router.moe_aux_loss_coeff = l.coeffs;
  c.router.moe_z_loss_coeff = l.z_loss;
  c.router.moe_router_enable_expert_bias = l.expert_bias;
  c.router.moe_router_bias_update_rate = 0.01;
  c.router.calculate_per_token_loss = l.per_token;
  return c;
}

DecoderModelConfig model_config(bool per_token,
                                RecomputeGranularity recompute = RecomputeGranularity::none) {
  return {.vocab = kVocab,
          .hidden = kHidden,
          .num_layers = kLayers,
          .heads = 4,
          .kv_groups = 2,
          .seq = kSeq,
          .micro_batch = kBatch,
          .seed = 11,
          .init_scale = 0.3,
          .calculate_per_token_loss = per_token,
          .recompute_granularity = recompute};
}

std::int64_t token_of(std::int64_t sequence, std::int64_t position) {
  return static_cast<std::int64_t>(
      detail::mix64(static_cast<std::uint64_t>(sequence * 1000 + position)) % kVocab);
}

/// Microbatch `mb` of step `step` (1-based) on this rank: the global microbatch [S, B·DP] of
/// sequences (step−1)·GB + mb·B·DP + j, cut to the rank's CP-local tokens (DESIGN §3's order).
MicrobatchTokens tokens(SequenceShard const& shard, std::int64_t step, int mb) {
  std::int64_t const cols = shard.global_batch();
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kSeq * cols)), labels(ids.size()),
      index(ids.size());
  for (std::int64_t j = 0; j < cols; ++j) {
    std::int64_t const sequence = (step - 1) * kGlobalBatch + mb * cols + j;
    for (std::int64_t p = 0; p < kSeq; ++p) {
      auto const at = static_cast<std::size_t>(p * cols + j);
      ids[at] = token_of(sequence, p);
      labels[at] = token_of(sequence, p + 1);
      index[at] = sequence * kSeq + p;
    }
  }
  return {shard.extract_cp(std::span<std::int64_t const>(ids), 1),
          shard.extract_cp(std::span<std::int64_t const>(labels), 1),
          shard.extract_cp(std::span<std::int64_t const>(index), 1)};
}

/// What one step leaves: the global-batch loss, and per router (by weight name) its reduced
/// gradient and its expert bias after the step.
struct StepRecord {
  double loss = 0;
  std::map<std::string, std::vector<double>> router_grad, bias;
};

template <class F>
void for_each_router(Stage& stage, F&& f) {
  for (int c = 0; c < stage.num_chunks(); ++c)
    for (auto& layer : stage.layers(c)) f(layer->mlp().router());
}

/// One pipeline pass of step `step`; returns the global-batch mean loss on every rank.
double run_step(Stage& stage, ProcessGroups<Comm>& groups, SequenceShard const& shard, int vpp,
                std::int64_t step, bool training, bool per_token) {
  int const pp = groups.pp().size();
  int const dp = groups.mapping().dp(), cp = groups.mapping().cp();
  int const m = kGlobalBatch / (kBatch * dp);
  stage.begin_step(
      m, [&](int mb) { return tokens(shard, step, mb); }, training, step);
  float const sum =
      vpp > 1 ? run_pipeline(Interleaved{.stages = pp, .virtual_stages = vpp, .microbatches = m},
                             groups.pp(), stage)
                    .loss
              : run_pipeline(OneFOneB{.stages = pp, .microbatches = m}, groups.pp(), stage).loss;
  std::vector<double> v{per_token ? static_cast<double>(sum) * dp * cp / (kGlobalBatch * kSeq)
                                  : static_cast<double>(sum)};
  groups.dp_cp().all_reduce(std::span<double>(v));
  v[0] /= dp * cp;
  groups.pp().all_reduce(std::span<double>(v));
  return v[0];
}

/// Trains `steps` SGD steps under `fold` (VPP `vpp`); every rank records what its routers saw
/// (replicas record the same values, and the test compares each against the reference).
std::vector<StepRecord> train(FoldingConfig const& fold_cfg, int vpp, Losses const& losses,
                              int steps = 3,
                              RecomputeGranularity recompute = RecomputeGranularity::none) {
  auto const fold = FoldedMapping::from(fold_cfg);
  std::vector<StepRecord> out(static_cast<std::size_t>(steps));
  std::mutex mu;
  inproc::run(fold.world_size(), [&](Comm& world) {
    ProcessGroups<Comm> groups(fold, world);
    Stage stage(model_config(losses.per_token, recompute), moe_config(losses), groups, vpp);
    auto const shard = SequenceShard::of(groups, kSeq, kBatch);
    auto const params = stage.parameters();
    for (int s = 1; s <= steps; ++s) {
      for (auto* p : params) p->zero_grad();
      double const loss = run_step(stage, groups, shard, vpp, s, true, losses.per_token);
      finalize_model_grads(stage, groups, {.calculate_per_token_loss = losses.per_token});
      std::lock_guard lock(mu);
      auto& rec = out[static_cast<std::size_t>(s - 1)];
      rec.loss = loss;
      for_each_router(stage, [&](auto& router) {
        auto const& name = router.weight_param().name;
        rec.router_grad[name].assign(router.weight_grad().begin(), router.weight_grad().end());
        rec.bias[name].assign(router.expert_bias().begin(), router.expert_bias().end());
      });
      for (auto* p : params)
        for (std::size_t i = 0; i < p->value.size(); ++i)
          p->value[i] -= static_cast<float>(kLr) * p->grad[i];
    }
  });
  return out;
}

void expect_same_steps(std::vector<StepRecord> const& got, std::vector<StepRecord> const& want,
                       std::string const& what) {
  INFO(what);
  REQUIRE(got.size() == want.size());
  for (std::size_t s = 0; s < got.size(); ++s) {
    INFO("step " << s + 1);
    CHECK(std::abs(got[s].loss - want[s].loss) <= 1e-5 * std::abs(want[s].loss));
    REQUIRE(got[s].router_grad.size() == static_cast<std::size_t>(kLayers));
    for (auto const& [name, g] : got[s].router_grad) {
      INFO(name);
      double const e = test::relative_error(g, want[s].router_grad.at(name));
      CHECK(e <= 1e-5);
      auto const& b = got[s].bias.at(name);
      auto const& wb = want[s].bias.at(name);
      REQUIRE(b.size() == wb.size());
      for (std::size_t i = 0; i < b.size(); ++i) CHECK(b[i] == Approx(wb[i]).margin(1e-7));
    }
  }
}

FoldingConfig const kTpCpPpVpp{.world = 8, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 1};
FoldingConfig const kCpPp{.world = 4, .cp = 2, .pp = 2, .ep = 2, .etp = 1};
FoldingConfig const kTpPpDp{.world = 8, .tp = 2, .pp = 2, .ep = 2, .etp = 2};  // DP 2, EDP 2

}  // namespace

TEST_CASE(
    "with every auxiliary loss on, folded steps equal the 1-rank steps (PP 2, VPP 2, CP 2, "
    "TP 2, EP over TP and CP)",
    "[train][moe][aux]") {
  auto const losses = all_losses();
  auto const serial = train({.world = 1}, 1, losses);
  CHECK(serial.back().loss < serial.front().loss);
  expect_same_steps(train(kTpCpPpVpp, 2, losses), serial, "TP2·CP2·PP2·VPP2 / EP4");
  expect_same_steps(train(kCpPp, 1, losses), serial, "CP2·PP2 / EP2");
  // Megatron's --recompute-granularity full: the stage re-runs each chunk's forward.
  expect_same_steps(train(kTpCpPpVpp, 2, losses, 3, RecomputeGranularity::full), serial,
                    "TP2·CP2·PP2·VPP2 / EP4, full recomputation");
}

TEST_CASE("with the local auxiliary losses on, DP 2 folded steps equal the 1-rank steps",
          "[train][moe][aux]") {
  auto const losses = all_losses(/*with_global=*/false);
  auto const serial = train({.world = 1}, 1, losses);
  expect_same_steps(train(kTpPpDp, 1, losses), serial, "TP2·PP2·DP2 / EP2·ETP2");
}

TEST_CASE("expert biases (sigmoid score) evolve as in the 1-rank run under every folding",
          "[train][moe][expert_bias]") {
  auto const losses = expert_bias();
  auto const serial = train({.world = 1}, 1, losses);
  // The biases moved: the update ran, from counts taken once per microbatch.
  bool moved = false;
  for (auto const& [name, b] : serial.back().bias)
    for (double v : b) moved = moved || v != 0.0;
  CHECK(moved);
  expect_same_steps(train(kTpCpPpVpp, 2, losses), serial, "TP2·CP2·PP2·VPP2 / EP4");
  expect_same_steps(train(kTpPpDp, 1, losses), serial, "TP2·PP2·DP2 / EP2·ETP2");
}

TEST_CASE("per-token-loss mode trains like the default mode on unmasked data",
          "[train][moe][per_token]") {
  auto per_token = all_losses();
  per_token.per_token = true;
  auto const serial = train({.world = 1}, 1, all_losses());
  expect_same_steps(train({.world = 1}, 1, per_token), serial, "1 rank, per-token");
  expect_same_steps(train(kTpCpPpVpp, 2, per_token), serial, "TP2·CP2·PP2·VPP2, per-token");
}

TEST_CASE("statistics are counted once per microbatch: never on a recompute or an evaluation",
          "[train][moe][count_once]") {
  auto const fold = FoldedMapping::from(kTpCpPpVpp);
  Losses losses = expert_bias();
  losses.types.push_back(LoadBalancingType::global_aux_loss);
  losses.coeffs.push_back(0.1);
  std::vector<std::string> failures(static_cast<std::size_t>(fold.world_size()));
  // The reduced gradients of step 2 with and without an evaluation pass before it.
  std::vector<std::map<std::string, std::vector<float>>> grads(2);
  for (int with_eval = 0; with_eval < 2; ++with_eval) {
    inproc::run(fold.world_size(), [&](Comm& world) {
      auto& fail = failures[static_cast<std::size_t>(world.rank())];
      ProcessGroups<Comm> groups(fold, world);
      Stage stage(model_config(false, RecomputeGranularity::full), moe_config(losses), groups, 2);
      auto const shard = SequenceShard::of(groups, kSeq, kBatch);
      auto const params = stage.parameters();
      int const m = kGlobalBatch / kBatch;  // DP 1
      std::int64_t const local_tokens = kSeq * kBatch / (fold.tp() * fold.cp());
      for (int s = 1; s <= 2; ++s) {
        for (auto* p : params) p->zero_grad();
        if (with_eval && s == 2) {
          run_step(stage, groups, shard, 2, 7, /*training=*/false, false);
          for_each_router(stage, [&](auto& router) {
            for (auto c : router.local_tokens_per_expert())
              if (c != 0) fail += "an evaluation forward counted tokens; ";
          });
          if (stage.aux_loss() != 0.0) fail += "an evaluation forward has an auxiliary loss; ";
        }
        run_step(stage, groups, shard, 2, s, true, false);
        // Each of the M microbatches is routed once with K experts per token, although the
        // stage recomputed most of them in backward.
        for_each_router(stage, [&](auto& router) {
          std::int64_t n = 0;
          for (auto c : router.local_tokens_per_expert()) n += c;
          if (n != local_tokens * kTopK * m)
            fail += fmt::format("{} counted {} routed entries, expected T·K·M = {}·{}·{}; ",
                                router.weight_param().name, n, local_tokens, kTopK, m);
        });
        finalize_model_grads(stage, groups);
        if (s == 2 && groups.dp_cp().rank() == 0 && groups.tp().rank() == 0)
          for (auto* p : params)
            if (p->name.find("router") != std::string::npos) {
              static std::mutex mu;
              std::lock_guard lock(mu);
              grads[static_cast<std::size_t>(with_eval)][p->name] = p->grad.vector();
            }
        for (auto* p : params)
          for (std::size_t i = 0; i < p->value.size(); ++i) p->value[i] -= 0.05f * p->grad[i];
      }
    });
  }
  for (auto const& f : failures) CHECK(f.empty());
  if (!failures[0].empty()) FAIL_CHECK(failures[0]);
  // The evaluation left no state behind: step 2 is bitwise the same with or without it.
  REQUIRE(grads[0].size() == static_cast<std::size_t>(kLayers));
  CHECK(grads[0] == grads[1]);
}

namespace {
/// The MoE layer, counting its forwards by mode (the stage's MLP slot).
struct CountingMoe : Moe {
  using Moe::Moe;
  std::map<ForwardMode, int> forwards;
  Buffer<float> forward(View<float const> x, ForwardContext const& ctx) {
    ++forwards[ctx.mode];
    return Moe::forward(x, ctx);
  }
};
using CountingStage = DecoderStage<test::Exec, float, Comm, CountingMoe>;
}  // namespace

TEST_CASE("without recomputation every microbatch runs one forward per layer, with the "
          "gradients of full recomputation",
          "[train][moe][recompute]") {
  auto const fold = FoldedMapping::from(kCpPp);  // PP 2: stage 0 holds PP microbatches
  int const m = kGlobalBatch / kBatch;
  // Per mode: every rank's parameter gradients after one step, and its layers' forward counts.
  std::map<RecomputeGranularity, std::vector<std::map<std::string, std::vector<float>>>> grads;
  std::map<RecomputeGranularity, std::vector<std::map<ForwardMode, int>>> counts;
  std::vector<int> pp_rank(static_cast<std::size_t>(fold.world_size()));
  for (auto mode : {RecomputeGranularity::none, RecomputeGranularity::full}) {
    grads[mode].resize(static_cast<std::size_t>(fold.world_size()));
    counts[mode].resize(static_cast<std::size_t>(fold.world_size()));
    inproc::run(fold.world_size(), [&](Comm& world) {
      ProcessGroups<Comm> groups(fold, world);
      CountingStage stage(model_config(false, mode), moe_config(all_losses()), groups);
      auto const shard = SequenceShard::of(groups, kSeq, kBatch);
      auto const params = stage.parameters();
      for (auto* p : params) p->zero_grad();
      stage.begin_step(m, [&](int mb) { return tokens(shard, 1, mb); }, true, 1);
      run_pipeline(OneFOneB{.stages = 2, .microbatches = m}, groups.pp(), stage);
      auto const r = static_cast<std::size_t>(world.rank());
      pp_rank[r] = groups.pp().rank();
      for (auto* p : params) grads[mode][r][p->name] = p->grad.vector();
      for (auto& layer : stage.layers(0))
        for (auto [k, n] : layer->mlp().forwards) counts[mode][r][k] += n;
    });
  }
  int const layers_per_stage = kLayers / 2;
  for (std::size_t r = 0; r < grads[RecomputeGranularity::none].size(); ++r) {
    INFO("rank " << r);
    auto const& none = counts[RecomputeGranularity::none][r];
    CHECK(none.at(ForwardMode::train) == m * layers_per_stage);
    CHECK_FALSE(none.contains(ForwardMode::recompute));
    // Full recomputation re-ran the forwards of stage 0 (its layers held another microbatch).
    if (pp_rank[r] == 0)
      CHECK(counts[RecomputeGranularity::full][r].at(ForwardMode::recompute) > 0);
    // Recomputing the same forward from the same input gives the same bits.
    CHECK(grads[RecomputeGranularity::none][r] == grads[RecomputeGranularity::full][r]);
  }
}

TEST_CASE("a train forward of a microbatch already counted in the step is refused",
          "[train][moe][count_once]") {
  auto const fold = FoldedMapping::from({.world = 1});
  inproc::run(1, [&](Comm& world) {
    ProcessGroups<Comm> groups(fold, world);
    Moe moe(moe_config(all_losses()), groups);
    std::vector<float> x(static_cast<std::size_t>(kSeq * kBatch * kHidden), 0.5f);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i));
    ForwardContext const ctx{.batch = kBatch, .microbatch = 3};
    moe.forward(std::span<float const>(x), ctx);
    CHECK_THROWS_WITH(moe.forward(std::span<float const>(x), ctx),
                      Catch::Contains("microbatch 3 had a train forward already"));
    // A recompute replays it; one of a microbatch never trained is refused.
    CHECK_NOTHROW(moe.forward(
        std::span<float const>(x),
        ForwardContext{.mode = ForwardMode::recompute, .batch = kBatch, .microbatch = 3}));
    CHECK_THROWS_WITH(
        moe.forward(
            std::span<float const>(x),
            ForwardContext{.mode = ForwardMode::recompute, .batch = kBatch, .microbatch = 4}),
        Catch::Contains("recompute of microbatch 4 before its train forward"));
    // seq_aux_loss needs B from the input's context.
    CHECK_THROWS_WITH(moe.forward(std::span<float const>(x), ForwardContext{}),
                      Catch::Contains("seq_aux_loss needs the micro-batch size B"));
    moe.reset_step_state();
    CHECK_NOTHROW(moe.forward(std::span<float const>(x), ctx));
  });
}

TEST_CASE("expert-bias counts are taken after token dropping, padding slots included",
          "[train][moe][expert_bias]") {
  using Dropping = MoELayer<test::Exec, TopKRouter<test::Exec, SigmoidScore, float>, AllToAllDispatcher<DropByProbs>,
                            GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, float>, Comm>;
  auto const fold = FoldedMapping::from({.world = 2, .ep = 2, .etp = 1});
  std::int64_t const tokens = 12, experts = 8;
  for (bool pad : {false, true}) {
    INFO("pad to capacity: " << pad);
    std::vector<std::string> failures(2);
    inproc::run(2, [&](Comm& world) {
      ProcessGroups<Comm> groups(fold, world);
      auto cfg = moe_config(expert_bias());
      cfg.router.moe_expert_capacity_factor = 0.5;  // C = ceil(12·2/8 · 0.5) = 2 per expert
      cfg.router.moe_pad_expert_input_to_capacity = pad;
      Dropping moe(cfg, groups);
      std::vector<float> x(static_cast<std::size_t>(tokens * kHidden));
      for (std::size_t i = 0; i < x.size(); ++i)
        x[i] = std::sin(0.7f * static_cast<float>(i) + static_cast<float>(world.rank()));
      moe.forward(std::span<float const>(x), ForwardContext{.batch = 1, .microbatch = 0});
      // An independent count: the router's own top-k (no dropping) …
      auto& fail = failures[static_cast<std::size_t>(world.rank())];
      auto const counts = moe.expert_bias_counts();
      std::int64_t kept = 0, most = 0;
      for (auto c : counts) kept += c, most = std::max(most, c);
      // … holds T·K = 24 entries over 8 experts; capacity 2 keeps at most 2 per expert, and
      // padding fills every expert to exactly 2.
      if (most > 2) fail += fmt::format("an expert counted {} > capacity 2; ", most);
      if (pad && kept != 2 * experts) fail += fmt::format("padded count {} != E·C = 16; ", kept);
      if (!pad && kept >= tokens * kTopK) fail += "nothing was dropped before counting; ";
      auto const& meta = moe.dispatch_metadata();
      if (!std::equal(counts.begin(), counts.end(), meta.local_tokens_per_expert.begin()))
        fail += "counts differ from the dispatcher's final routing; ";
    });
    for (auto const& f : failures) CHECK(f.empty());
    if (!failures[0].empty()) FAIL_CHECK(failures[0]);
  }
}
