// Example: one step of a tiny MLP split over a pipeline of 4 in-process ranks.
//
// The MLP has 8 layers y = tanh(W·x + b) of width 4 and the loss ½‖y − t‖² per microbatch. Each
// PP rank holds the layers of its virtual stages: with 1F1B rank p holds layers 2p and 2p + 1;
// with interleaved 1F1B (VPP = 2) chunk c of rank p is virtual stage 4c + p and holds layer
// 4c + p. `moefold::run_pipeline` calls the stage's forward and backward in the schedule's order
// and moves activations and gradients between the ranks. The program prints the loss and a
// checksum of the gradients next to those of the same step on one rank, and the bubble that the
// executor's logical clock measured next to the simulation's and the formula's.
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/pipeline/simulation.hpp"

namespace {

constexpr int kLayers = 8;
constexpr std::size_t kWidth = 4;
constexpr int kMicrobatches = 8;

using Vec = std::vector<double>;

// Parameters and data from formulas, so that every rank builds the same ones.
double weight(int layer, std::size_t i) { return 0.8 * std::sin(0.37 * double(i) + 1.3 * layer); }
double bias(int layer, std::size_t i) { return 0.1 * std::cos(0.9 * double(i) - layer); }
double data(int mb, std::size_t j) { return std::cos(0.5 * mb + 0.9 * double(j)); }
double target(int mb, std::size_t j) { return 0.5 * std::sin(0.3 * mb - 0.4 * double(j)); }

// Gradients of one layer: W (row-major) then b.
struct LayerGrad {
  Vec w = Vec(kWidth * kWidth, 0.0), b = Vec(kWidth, 0.0);
  double checksum() const {
    double s = 0;
    for (double g : w) s += g;
    for (double g : b) s += g;
    return s;
  }
};

Vec layer_forward(int l, Vec const& x) {
  Vec y(kWidth);
  for (std::size_t i = 0; i < kWidth; ++i) {
    double s = bias(l, i);
    for (std::size_t j = 0; j < kWidth; ++j) s += weight(l, i * kWidth + j) * x[j];
    y[i] = std::tanh(s);
  }
  return y;
}
// Accumulates the layer's gradient into g; returns the gradient of its input.
Vec layer_backward(int l, Vec const& x, Vec const& y, Vec const& dy, LayerGrad& g) {
  Vec dx(kWidth, 0.0);
  for (std::size_t i = 0; i < kWidth; ++i) {
    double const d = dy[i] * (1 - y[i] * y[i]);
    g.b[i] += d;
    for (std::size_t j = 0; j < kWidth; ++j) {
      g.w[i * kWidth + j] += d * x[j];
      dx[j] += weight(l, i * kWidth + j) * d;
    }
  }
  return dx;
}

// The layers of one PP rank: a moefold::PipelineStageModel.
class MlpStage {
 public:
  using value_type = double;

  MlpStage(int rank, int stages, int chunks)
      : rank_(rank), stages_(stages), chunks_(chunks), per_chunk_(kLayers / (stages * chunks)) {}

  std::size_t activation_size() const { return kWidth; }

  // The first virtual stage reads the data (its `in` is empty); the last writes the loss.
  void forward(int mb, int chunk, std::span<double const> in, std::span<double> out) {
    int const v = chunk * stages_ + rank_;
    auto& acts = stash_[{mb, chunk}];  // kept for the backward
    if (v == 0) {
      acts.emplace_back(kWidth);
      for (std::size_t j = 0; j < kWidth; ++j) acts[0][j] = data(mb, j);
    } else {
      acts.emplace_back(in.begin(), in.end());
    }
    for (int l = first_layer(v); l < first_layer(v) + per_chunk_; ++l)
      acts.push_back(layer_forward(l, acts.back()));
    if (v == stages_ * chunks_ - 1) {
      out[0] = 0;
      for (std::size_t j = 0; j < kWidth; ++j)
        out[0] += 0.5 * std::pow(acts.back()[j] - target(mb, j), 2);
    } else {
      std::copy(acts.back().begin(), acts.back().end(), out.begin());
    }
  }

  // The last virtual stage gets d loss / d loss (= 1); the first one's `in_grad` is empty.
  void backward(int mb, int chunk, std::span<double const> out_grad, std::span<double> in_grad) {
    int const v = chunk * stages_ + rank_;
    auto const acts = std::move(stash_.at({mb, chunk}));
    stash_.erase({mb, chunk});
    Vec dy(out_grad.begin(), out_grad.end());
    if (v == stages_ * chunks_ - 1) {  // d loss / d y
      dy.assign(kWidth, 0.0);
      for (std::size_t j = 0; j < kWidth; ++j)
        dy[j] = out_grad[0] * (acts.back()[j] - target(mb, j));
    }
    for (int k = per_chunk_ - 1; k >= 0; --k) {
      int const l = first_layer(v) + k;
      dy = layer_backward(l, acts[std::size_t(k)], acts[std::size_t(k) + 1], dy, grads_[l]);
    }
    if (v != 0) std::copy(dy.begin(), dy.end(), in_grad.begin());
  }

  std::map<int, LayerGrad> const& grads() const { return grads_; }

 private:
  int first_layer(int virtual_stage) const { return virtual_stage * per_chunk_; }

  int rank_, stages_, chunks_, per_chunk_;
  std::map<std::pair<int, int>, std::vector<Vec>> stash_;
  std::map<int, LayerGrad> grads_;  // by global layer index
};
static_assert(moefold::PipelineStageModel<MlpStage>);

// The same step on one rank: per microbatch, every layer forward, then every layer backward.
std::pair<double, std::vector<LayerGrad>> single_rank_step() {
  std::vector<LayerGrad> grads(kLayers);
  double loss = 0;
  for (int mb = 0; mb < kMicrobatches; ++mb) {
    std::vector<Vec> acts(1, Vec(kWidth));
    for (std::size_t j = 0; j < kWidth; ++j) acts[0][j] = data(mb, j);
    for (int l = 0; l < kLayers; ++l) acts.push_back(layer_forward(l, acts.back()));
    Vec dy(kWidth);
    for (std::size_t j = 0; j < kWidth; ++j) {
      loss += 0.5 * std::pow(acts.back()[j] - target(mb, j), 2);
      dy[j] = acts.back()[j] - target(mb, j);
    }
    for (int l = kLayers - 1; l >= 0; --l)
      dy = layer_backward(l, acts[std::size_t(l)], acts[std::size_t(l) + 1], dy,
                          grads[std::size_t(l)]);
  }
  return {loss, grads};
}

// Sums the per-layer checksums in layer order.
double checksum(std::vector<LayerGrad> const& grads) {
  double s = 0;
  for (auto const& g : grads) s += g.checksum();
  return s;
}

template <moefold::PipelineSchedule S>
void run_on_pipeline(char const* name, S const& schedule) {
  int const pp = schedule.num_stages();
  std::vector<LayerGrad> grads(kLayers);
  double loss = 0, bubble = 0;
  moefold::inproc::run(pp, [&](moefold::inproc::Communicator& world) {
    MlpStage stage(world.rank(), pp, schedule.num_chunks());
    // world is the pp group here; with a folding, pass ProcessGroups::pp().
    auto const step = moefold::run_pipeline(schedule, world, stage, {.logical_clock = true});
    for (auto const& [layer, g] : stage.grads()) grads[std::size_t(layer)] = g;  // own layers
    if (world.rank() == pp - 1) loss = step.loss;  // the last stage computed the loss
    if (world.rank() == 0) bubble = step.idle_fraction();
  });
  auto const [ref_loss, ref_grads] = single_rank_step();
  fmt::print("{}\n", name);
  fmt::print("  loss               {:.15g}   one rank: {:.15g}\n", loss, ref_loss);
  fmt::print("  gradient checksum  {:.15g}   one rank: {:.15g}\n", checksum(grads),
             checksum(ref_grads));
  fmt::print("  bubble (logical clock) {:.4f}   simulated: {:.4f}   formula: {:.4f}\n", bubble,
             moefold::simulate(schedule).idle_fraction(), schedule.ideal_bubble_fraction());
}

}  // namespace

int main() {
  run_on_pipeline("1F1B, PP = 4, M = 8",
                  moefold::OneFOneB{.stages = 4, .microbatches = kMicrobatches});
  run_on_pipeline(
      "interleaved 1F1B, PP = 4, VPP = 2, M = 8",
      moefold::Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = kMicrobatches});
  return 0;
}
