// Per-microbatch activations (nn/microbatch_stash.hpp): a stash moves a layer's saved members
// aside and back without copying, refuses a microbatch stashed twice or never stashed, and a
// decoder layer that runs two forwards before their backwards gives each microbatch the
// gradients of a forward and backward run back to back.

#include <cstdint>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/nn/decoder_layer.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "support/catch.hpp"
#include "unit/nn/nn_support.hpp"

using namespace moefold;
using namespace moefold::test;

TEST_CASE("a stash swaps members aside and back, reusing the buffers of finished microbatches",
          "[nn][stash]") {
  MicrobatchStash stash;
  Buffer<float> x(3);
  int rows = 7;
  x[0] = 1.f;
  float const* first = x.data();
  stash.stash(0, std::tie(x, rows));
  CHECK(x.empty());  // no spare yet: the live member is a fresh, empty one
  x = Buffer<float>(3);
  x[0] = 2.f;
  rows = 9;
  float const* second = x.data();
  stash.stash(1, std::tie(x, rows));
  CHECK(stash.size() == 2);

  stash.restore(0, std::tie(x, rows));
  CHECK(x.data() == first);  // moved back, not copied
  CHECK(x[0] == 1.f);
  CHECK(rows == 7);
  stash.restore(1, std::tie(x, rows));
  CHECK(x.data() == second);
  CHECK(rows == 9);
  CHECK(stash.size() == 0);

  // The next stash hands out the spare (microbatch 0's buffer): a warm step allocates nothing.
  stash.stash(2, std::tie(x, rows));
  CHECK(x.data() == first);
}

TEST_CASE("a microbatch stashed twice or restored without a stash is refused by number",
          "[nn][stash]") {
  MicrobatchStash stash;
  Buffer<float> x(2);
  stash.stash(4, std::tie(x));
  CHECK_THROWS_WITH(stash.stash(4, std::tie(x)), Catch::Contains("microbatch 4 is stashed already"));
  CHECK_THROWS_WITH(stash.restore(5, std::tie(x)),
                    Catch::Contains("no stashed activations of microbatch 5"));
  stash.restore(4, std::tie(x));
  CHECK_THROWS_WITH(stash.restore(4, std::tie(x)),
                    Catch::Contains("no stashed activations of microbatch 4"));
  stash.stash(6, std::tie(x));
  stash.drop();
  CHECK(stash.size() == 0);
  CHECK_THROWS_WITH(stash.restore(6, std::tie(x)),
                    Catch::Contains("no stashed activations of microbatch 6"));
}

namespace {
constexpr std::int64_t kHidden = 16, kSeq = 8, kBatch = 2;

using Layer = DecoderLayer<Exec, float, Comm>;

Layer::Config layer_config() {
  return {.name = "layers.0",
          .attention = {.hidden = kHidden, .heads = 4, .kv_groups = 2, .seed = 3, .init_scale = 0.3},
          .mlp = {.hidden = kHidden, .ffn = 32, .seed = 3, .init_scale = 0.3}};
}

std::vector<float> input(int mb) {
  std::vector<float> x(static_cast<std::size_t>(kSeq * kBatch * kHidden));
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * static_cast<float>(mb));
  return x;
}
std::vector<float> output_grad(int mb) {
  auto g = input(mb + 10);
  for (auto& v : g) v *= 0.5f;
  return g;
}

/// Input gradient and every parameter gradient of one backward.
struct Grads {
  std::vector<float> dx;
  std::vector<std::vector<float>> params;
};
template <class Layer>
Grads grads_of(Layer& layer, std::vector<float> const& dx) {
  Grads g{dx, {}};
  for (auto* p : layer.parameters()) g.params.push_back(p->grad.vector());
  return g;
}
}  // namespace

TEST_CASE("a decoder layer with two microbatches in flight gives each its own gradients",
          "[nn][stash]") {
  inproc::run(1, [&](Comm& world) {
    Groups groups(mapping_of({}), world);
    Layer layer(layer_config(), groups);
    auto const params = layer.parameters();
    auto zero = [&] {
      for (auto* p : params) p->zero_grad();
    };
    auto run = [&](int mb) {
      auto const x = input(mb);
      return layer.forward(std::span<float const>(x), kBatch);
    };
    auto back = [&](int mb) {
      auto const dy = output_grad(mb);
      return layer.backward(std::span<float const>(dy)).vector();
    };
    // Each microbatch alone: forward, backward.
    std::vector<Grads> alone;
    for (int mb = 0; mb < 2; ++mb) {
      zero();
      run(mb);
      alone.push_back(grads_of(layer, back(mb)));
    }
    // Both forwards first (stashed), then the backwards in order.
    std::vector<Grads> in_flight;
    run(0);
    layer.stash(0);
    run(1);
    layer.stash(1);
    for (int mb = 0; mb < 2; ++mb) {
      zero();
      layer.restore(mb);
      in_flight.push_back(grads_of(layer, back(mb)));
    }
    for (int mb = 0; mb < 2; ++mb) {
      INFO("microbatch " << mb);
      CHECK(in_flight[mb].dx == alone[mb].dx);
      CHECK(in_flight[mb].params == alone[mb].params);
    }
    // The two microbatches differ, so a backward of the wrong one would have been caught.
    CHECK(alone[0].dx != alone[1].dx);
  });
}
