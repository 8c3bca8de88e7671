// A tiny folded model (vocab-parallel embedding → decoder layer → final norm → vocab-parallel
// output layer → vocab-parallel cross-entropy): its loss and gradients equal the single-rank
// model's under every folding, and the single-rank model's gradients equal central finite
// differences in fp64. Also: causality of the attention, a naive attention reference, and the
// errors for shapes a folding cannot split.

#include <cmath>
#include <fmt/format.h>

#include "moefold/nn/decoder_layer.hpp"
#include "moefold/nn/vocab_parallel_cross_entropy.hpp"
#include "moefold/nn/vocab_parallel_embedding.hpp"
#include "support/finite_difference.hpp"
#include "unit/nn/nn_support.hpp"

using namespace moefold;
using namespace moefold::test;

namespace {

constexpr std::uint64_t kSeed = 99;
constexpr std::int64_t kVocab = 64, kHidden = 32, kSeq = 32, kBatch = 4;

template <class T>
struct TinyModel {
  VocabParallelEmbedding<Exec, T, Comm> embedding;
  DecoderLayer<Exec, T, Comm> layer;
  RmsNorm<Exec, T> final_norm;
  ColumnParallelLinear<Exec, T, Comm> output;
  VocabParallelCrossEntropy<Exec, T, Comm> loss;
  std::int64_t batch = 0;

  /// With `bias_and_rope`: a QKV bias (random, not Megatron's zeros, so that it matters) and
  /// rotary base 1e6 (Mixtral's).
  explicit TinyModel(Groups& g, bool bias_and_rope = false)
      : embedding({.vocab = kVocab, .hidden = kHidden, .seed = kSeed, .init_scale = 1.0}, g.tp()),
        layer({.name = "layers.0",
               .attention = {.hidden = kHidden,
                             .heads = 8,
                             .kv_groups = 4,
                             .head_dim = 8,
                             .rope_base = bias_and_rope ? 1e6 : 10000.0,
                             .add_qkv_bias = bias_and_rope,
                             .seed = kSeed,
                             .init_scale = 0.3},
               .mlp = {.hidden = kHidden, .ffn = 64, .seed = kSeed, .init_scale = 0.3}},
              g),
        final_norm({.name = "final_layernorm.weight", .hidden = kHidden}),
        output({.name = "output_layer.weight",
                .in = kHidden,
                .out = kVocab,
                .seed = kSeed,
                .scale = 0.3},
               g.tp()),
        loss(kVocab, g.tp()) {
    if (!bias_and_rope) return;
    auto& b = layer.attention().linear_qkv_bias();
    auto const global = random_tensor<T>(static_cast<std::size_t>(b.global_cols), "qkv bias");
    auto const local = b.local_of(std::span<T const>(global));
    std::copy(local.begin(), local.end(), b.value.begin());
  }

  /// ids, labels: CP-local [S/CP, B] → per-token losses of the CP-local tokens (FP32 for bf16).
  std::vector<compute_t<T>> forward(std::vector<std::int64_t> const& ids,
                         std::vector<std::int64_t> const& labels, std::int64_t b) {
    batch = b;
    auto const x = embedding.forward(std::span<std::int64_t const>(ids));
    auto const y = layer.forward(std::span<T const>(x), b);
    auto const z = final_norm.forward(std::span<T const>(y));
    auto const logits = output.forward(std::span<T const>(z));
    return loss.forward(std::span<T const>(logits), std::span<std::int64_t const>(labels));
  }
  /// Backward of (Σ losses) / n_total.
  void backward(std::size_t tokens, double n_total) {
    std::vector<compute_t<T>> dloss(tokens, static_cast<compute_t<T>>(1.0 / n_total));
    auto const dlogits = loss.backward(std::span<compute_t<T> const>(dloss));
    auto const dz = output.backward(std::span<T const>(dlogits));
    auto const dy = final_norm.backward(std::span<T const>(dz));
    auto const dx = layer.backward(std::span<T const>(dy));
    embedding.backward(std::span<T const>(dx));
  }
  ParamList<T> parameters() {
    ParamList<T> out = embedding.parameters();
    append(out, layer.parameters());
    append(out, final_norm.parameters());
    append(out, output.parameters());
    return out;
  }
};

std::vector<std::int64_t> token_ids(std::string_view name) {
  auto const u = random_tensor<double>(static_cast<std::size_t>(kSeq * kBatch), name);
  std::vector<std::int64_t> ids(u.size());
  for (std::size_t i = 0; i < u.size(); ++i)
    ids[i] =
        std::min<std::int64_t>(kVocab - 1, static_cast<std::int64_t>((u[i] + 1.0) / 2.0 * kVocab));
  return ids;
}

}  // namespace

TEST_CASE("a folded tiny model computes the single-rank loss and gradients",
          "[nn][model][embedding][cross_entropy]") {
  auto const ids = token_ids("ids"), labels = token_ids("labels");
  double const n_total = double(kSeq * kBatch);
  std::vector<float> ref_losses;
  std::map<std::string, std::vector<float>> ref_grads;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks&) {
    Groups groups(mapping_of({}), world);
    TinyModel<float> model(groups);
    ref_losses = model.forward(ids, labels, kBatch);
    model.backward(ref_losses.size(), n_total);
    for (auto* p : model.parameters()) ref_grads[p->name] = p->grad;
  });
  double ref_loss = 0;
  for (float l : ref_losses) ref_loss += l / n_total;
  REQUIRE(ref_grads.size() == 9);

  for (auto const f : all_foldings()) {
    INFO("folding " << f.str());
    expect_clean<InprocHarness>(f.world(), [&](Comm& world, RankChecks& checks) {
      Groups groups(mapping_of(f), world);
      auto const shard = SequenceShard::of(groups, kSeq, kBatch / f.dp);
      TinyModel<float> model(groups);
      auto const losses =
          model.forward(shard.extract_cp(std::span<std::int64_t const>(ids), 1),
                        shard.extract_cp(std::span<std::int64_t const>(labels), 1), shard.batch);
      expect_close(checks, losses, shard.extract_cp(std::span<float const>(ref_losses), 1),
                   "per-token losses");
      // The mean over the global batch: every TP rank holds the same CP-local losses.
      std::vector<double> sum{0.0};
      for (float l : losses) sum[0] += l / n_total;
      groups.dp_cp().all_reduce(std::span<double>(sum));
      checks.check(std::abs(sum[0] - ref_loss) <= 1e-5 * std::abs(ref_loss),
                   fmt::format("loss {} != single-rank loss {}", sum[0], ref_loss));
      model.backward(losses.size(), n_total);
      auto const params = model.parameters();
      reduce_gradients(params, groups);
      for (auto* p : params)
        expect_close(checks, p->grad, p->local_of(std::span<float const>(ref_grads.at(p->name))),
                     "gradient of " + p->name);
    });
  }
}

TEST_CASE("a bf16 tiny model follows the float model, its FP32 loss is the same folded",
          "[nn][model][bf16]") {
  // bf16 parameters and activations, FP32 accumulation, FP32 cross-entropy and main gradients,
  // against the float model with the same (bf16-rounded) parameters; then the folded bf16 model
  // against the single-rank bf16 model.
  auto const ids = token_ids("ids"), labels = token_ids("labels");
  double const n_total = double(kSeq * kBatch);
  auto mean = [&](auto const& losses) {
    double s = 0;
    for (auto l : losses) s += static_cast<double>(l) / n_total;
    return s;
  };
  double ref_loss = 0;
  std::map<std::string, std::vector<float>> ref_grads;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    TinyModel<bf16> b(groups);
    TinyModel<float> f(groups);
    auto const pb = b.parameters();
    auto const pf = f.parameters();
    for (std::size_t k = 0; k < pb.size(); ++k)
      for (std::int64_t i = 0; i < static_cast<std::int64_t>(pb[k]->size()); ++i)
        pf[k]->value[i] = static_cast<float>(pb[k]->value[i]);
    auto const lb = b.forward(ids, labels, kBatch);
    auto const lf = f.forward(ids, labels, kBatch);
    static_assert(std::is_same_v<std::decay_t<decltype(lb)>, std::vector<float>>,
                  "a bf16 model's losses are FP32");
    ref_loss = mean(lb);
    checks.check(std::abs(ref_loss - mean(lf)) <= 1e-2 * mean(lf),
                 fmt::format("bf16 loss {} vs float loss {}", ref_loss, mean(lf)));
    b.backward(lb.size(), n_total);
    f.backward(lf.size(), n_total);
    for (std::size_t k = 0; k < pb.size(); ++k) {
      auto const e = rel_error(pb[k]->grad, pf[k]->grad);
      checks.check(e <= 3e-2, fmt::format("gradient of {}: relative error {:.3e} against float",
                                          pb[k]->name, e));
      ref_grads[pb[k]->name] = pb[k]->grad;
    }
  });
  Folding const f{.tp = 2, .cp = 2, .dp = 2};
  expect_clean<InprocHarness>(f.world(), [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of(f), world);
    auto const shard = SequenceShard::of(groups, kSeq, kBatch / f.dp);
    TinyModel<bf16> model(groups);
    auto const losses =
        model.forward(shard.extract_cp(std::span<std::int64_t const>(ids), 1),
                      shard.extract_cp(std::span<std::int64_t const>(labels), 1), shard.batch);
    std::vector<double> sum{mean(losses)};
    groups.dp_cp().all_reduce(std::span<double>(sum));
    checks.check(std::abs(sum[0] - ref_loss) <= 1e-2 * std::abs(ref_loss),
                 fmt::format("folded bf16 loss {} != single-rank bf16 loss {}", sum[0], ref_loss));
    model.backward(losses.size(), n_total);
    auto const params = model.parameters();
    reduce_gradients(params, groups);
    for (auto* p : params)
      expect_close(checks, p->grad, p->local_of(std::span<float const>(ref_grads.at(p->name))),
                   "gradient of " + p->name, 3e-2);
  });
}

TEST_CASE("the model's gradients equal central finite differences in fp64",
          "[nn][model][finite_differences]") {
  bool const bias_and_rope = GENERATE(false, true);  // true: --add-qkv-bias, --rotary-base 1e6
  INFO("QKV bias and rotary base 1e6: " << bias_and_rope);
  auto const ids = token_ids("ids"), labels = token_ids("labels");
  std::vector<std::string> report;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    TinyModel<double> model(groups, bias_and_rope);
    double const n_total = double(kSeq * kBatch);
    auto loss = [&] {
      double s = 0;
      for (double l : model.forward(ids, labels, kBatch)) s += l / n_total;
      return s;
    };
    auto const losses = model.forward(ids, labels, kBatch);
    model.backward(losses.size(), n_total);
    double const eps = 1e-5;
    for (auto* p : model.parameters()) {
      // A spread of elements of every parameter (the embedding rows of tokens in the batch).
      std::vector<double> analytic, numeric;
      std::size_t const step = std::max<std::size_t>(1, p->size() / 12);
      for (std::size_t i = p->size() / 7; i < p->size(); i += step) {
        analytic.push_back(p->grad[i]);
        numeric.push_back(central_difference(p->value[i], loss, eps));
      }
      double const e = rel_error(analytic, numeric);
      checks.check(e <= 1e-6,
                   fmt::format("{}: finite-difference relative error {:.3e}", p->name, e));
      report.push_back(fmt::format("{} {:.2e}", p->name, e));
    }
  });
  INFO(fmt::format("{}", fmt::join(report, "\n")));
  CHECK(report.size() == (bias_and_rope ? 10u : 9u));
}

TEST_CASE("attention is causal: later tokens do not change earlier outputs, also across CP",
          "[nn][attention]") {
  AttentionConfig const cfg{.hidden = 16, .heads = 4, .kv_groups = 2, .seed = 3, .init_scale = 0.5};
  std::int64_t const seq = 16, batch = 2, cut = 5;
  auto const x = random_tensor<float>(static_cast<std::size_t>(seq * batch * 16), "x");
  auto x2 = x;
  for (std::size_t i = static_cast<std::size_t>(cut * batch * 16); i < x2.size(); ++i)
    x2[i] += 1.0f;
  for (Folding const f : {Folding{1, 1, 1}, Folding{2, 2, 1}, Folding{1, 4, 1}}) {
    INFO("folding " << f.str());
    expect_clean<InprocHarness>(f.world(), [&](Comm& world, RankChecks& checks) {
      Groups groups(mapping_of(f), world);
      auto const shard = SequenceShard::of(groups, seq, batch);
      Attention<Exec, float, Comm> a(cfg, groups.tp(), groups.cp()), b(cfg, groups.tp(), groups.cp());
      auto const ya =
          a.forward(std::span<float const>(shard.extract(std::span<float const>(x), 16)), batch);
      auto const yb =
          b.forward(std::span<float const>(shard.extract(std::span<float const>(x2), 16)), batch);
      auto const pos = shard.positions();
      for (std::size_t j = 0; j < pos.size(); ++j) {
        bool same = true;
        for (std::size_t i = 0; i < static_cast<std::size_t>(batch * 16); ++i)
          same = same && ya[j * static_cast<std::size_t>(batch * 16) + i] ==
                             yb[j * static_cast<std::size_t>(batch * 16) + i];
        checks.check(same == (pos[j] < cut),
                     fmt::format("position {}: output {} after changing positions ≥ {}", pos[j],
                                 same ? "unchanged" : "changed", cut));
      }
    });
  }
}

TEST_CASE("attention equals a naive causal GQA attention with rotary embeddings",
          "[nn][attention]") {
  // The defaults, and Qwen2's QKV bias with Mixtral's rotary base (--add-qkv-bias,
  // --rotary-base 1000000): the reference adds the bias and rotates by base^(−2i/d).
  bool const bias = GENERATE(false, true);
  double const base = bias ? 1e6 : 10000.0;
  INFO("QKV bias " << bias << ", rotary base " << base);
  AttentionConfig const cfg{.hidden = 16,
                            .heads = 4,
                            .kv_groups = 2,
                            .rope_base = base,
                            .add_qkv_bias = bias,
                            .seed = 5,
                            .init_scale = 0.5};
  std::int64_t const seq = 8, batch = 2, h = 16, d = 4, heads = 4, groups_n = 2;
  auto const x = random_tensor<double>(static_cast<std::size_t>(seq * batch * h), "x");
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    Attention<Exec, double, Comm> attn(cfg, groups.tp(), groups.cp());
    std::vector<double> qkv_bias(static_cast<std::size_t>((heads + 2 * groups_n) * d), 0.0);
    if (bias) {
      qkv_bias = random_tensor<double>(qkv_bias.size(), "qkv bias");
      std::copy(qkv_bias.begin(), qkv_bias.end(), attn.linear_qkv_bias().value.begin());
    }
    auto const y = attn.forward(std::span<double const>(x), batch);
    auto const& wqkv = attn.linear_qkv().weight().value;                    // [G·(N/G+2)·d, H]
    auto const& wo = attn.linear_proj().weight().value;                     // [H, N·d]
    auto project = [&](std::int64_t s, std::int64_t b, std::int64_t row) {  // one qkv feature
      double acc = qkv_bias[static_cast<std::size_t>(row)];
      for (std::int64_t i = 0; i < h; ++i)
        acc += wqkv[static_cast<std::size_t>(row * h + i)] *
               x[static_cast<std::size_t>((s * batch + b) * h + i)];
      return acc;
    };
    auto head = [&](std::int64_t s, std::int64_t b, std::int64_t row0) {  // rotated head vector
      std::vector<double> v(static_cast<std::size_t>(d));
      for (std::int64_t i = 0; i < d; ++i) v[static_cast<std::size_t>(i)] = project(s, b, row0 + i);
      std::vector<double> r(v.size());
      for (std::int64_t i = 0; i < d / 2; ++i) {
        double const th = double(s) * std::pow(base, -2.0 * double(i) / double(d));
        r[static_cast<std::size_t>(i)] = v[static_cast<std::size_t>(i)] * std::cos(th) -
                                         v[static_cast<std::size_t>(i + d / 2)] * std::sin(th);
        r[static_cast<std::size_t>(i + d / 2)] =
            v[static_cast<std::size_t>(i + d / 2)] * std::cos(th) +
            v[static_cast<std::size_t>(i)] * std::sin(th);
      }
      return r;
    };
    std::int64_t const qpg = heads / groups_n, stride = (qpg + 2) * d;
    std::vector<double> expected(x.size(), 0.0);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t s = 0; s < seq; ++s) {
        std::vector<double> ctx(static_cast<std::size_t>(heads * d), 0.0);
        for (std::int64_t n = 0; n < heads; ++n) {
          std::int64_t const g = n / qpg;
          auto const q = head(s, b, g * stride + (n % qpg) * d);
          std::vector<double> score;
          for (std::int64_t t = 0; t <= s; ++t) {
            auto const k = head(t, b, g * stride + qpg * d);
            double dot = 0;
            for (std::int64_t i = 0; i < d; ++i)
              dot += q[static_cast<std::size_t>(i)] * k[static_cast<std::size_t>(i)];
            score.push_back(dot / std::sqrt(double(d)));
          }
          double mx = *std::max_element(score.begin(), score.end()), z = 0;
          for (auto& e : score) z += (e = std::exp(e - mx));
          for (std::int64_t t = 0; t <= s; ++t)
            for (std::int64_t i = 0; i < d; ++i)
              ctx[static_cast<std::size_t>(n * d + i)] +=
                  score[static_cast<std::size_t>(t)] / z *
                  project(t, b, g * stride + (qpg + 1) * d + i);
        }
        for (std::int64_t o = 0; o < h; ++o)
          for (std::int64_t i = 0; i < heads * d; ++i)
            expected[static_cast<std::size_t>((s * batch + b) * h + o)] +=
                wo[static_cast<std::size_t>(o * heads * d + i)] * ctx[static_cast<std::size_t>(i)];
      }
    expect_close(checks, y, expected, "attention output", 1e-12);
  });
}

TEST_CASE("shapes a folding cannot split give errors naming the rule and the numbers",
          "[nn][errors]") {
  expect_clean<InprocHarness>(4, [](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({.tp = 4}), world);
    auto heads = error_of([&] {
      Attention<Exec, float, Comm>({.name = "attn", .hidden = 24, .heads = 6, .kv_groups = 6},
                             groups.tp(), groups.cp());
    });
    checks.check(
        heads.find("Attention 'attn': num_attention_heads (6) is not divisible by TP = 4") !=
            std::string::npos,
        heads);
    auto kv = error_of([&] {
      Attention<Exec, float, Comm>({.name = "attn", .hidden = 32, .heads = 8, .kv_groups = 2},
                             groups.tp(), groups.cp());
    });
    checks.check(kv.find("num_query_groups (2) is not divisible by TP = 4") != std::string::npos,
                 kv);
    auto ffn = error_of([&] { DenseMlp<Exec, float, Comm>({.hidden = 8, .ffn = 6}, groups.tp()); });
    checks.check(
        ffn.find("out_features (12) is not divisible by parts·TP = 8") != std::string::npos, ffn);
    auto vocab = error_of(
        [&] { VocabParallelEmbedding<Exec, float, Comm>({.vocab = 10, .hidden = 4}, groups.tp()); });
    checks.check(vocab.find("vocabulary size (10) is not divisible by TP = 4") != std::string::npos,
                 vocab);
  });
  expect_clean<InprocHarness>(4, [](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({.tp = 2, .cp = 2}), world);
    Attention<Exec, float, Comm> attn({.hidden = 8, .heads = 2, .kv_groups = 2}, groups.tp(),
                                groups.cp());
    // One local row per sequence: S = 1·TP·CP = 4, but CP·SP needs S divisible by 2·CP·TP = 8.
    // Every rank throws the same error before its first collective.
    std::vector<float> x(8, 1.0f);
    auto seq = error_of([&] { attn.forward(std::span<float const>(x), 1); });
    checks.check(seq.find("sequence length S = 4 is not divisible by 2·CP·TP = 2·2·2 = 8") !=
                     std::string::npos,
                 seq);
    auto shard = error_of([&] { SequenceShard::of(groups, 12, 1); });
    checks.check(shard.find("S = 12 is not divisible by 2·CP·TP = 2·2·2 = 8") != std::string::npos,
                 shard);
  });
}
