// Example: one folded MoE layer on an in-process world — a starting template.
//
// 8 ranks: attention TP2 x CP2 x DP2, MoE EP8 x ETP1 (the EP group folds TP, CP and DP). Each
// rank pushes its own tokens through the layer (router → all-to-all dispatch → SwiGLU experts →
// combine), back-propagates, reduces gradients by class and prints what moved over each group.
#include <cmath>
#include <cstdio>
#include <mutex>
#include <span>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/train/gradient_reduction.hpp"

int main() {
  using Comm = moefold::inproc::Communicator;
  auto const fold = moefold::FoldedMapping::from(
      {.world = 8, .tp = 2, .cp = 2, .pp = 1, .ep = 8, .etp = 1});

  moefold::MoELayerConfig cfg{.name = "layers.0.mlp", .hidden_size = 64,
                              .moe_ffn_hidden_size = 128};
  cfg.router.num_experts = 16;
  cfg.router.moe_router_topk = 2;
  cfg.router.moe_aux_loss_coeff = {1e-2};  // load-balancing loss, statistics over tp_cp

  constexpr std::int64_t kTokens = 32;  // this rank's tokens [S/(TP·CP)·B, H]
  std::mutex print;
  moefold::inproc::run(fold.world_size(), [&](Comm& world) {
    moefold::ProcessGroups groups(fold, world);
    moefold::cpu::DefaultMoELayer<float, Comm> moe(cfg, groups);

    std::vector<float> x(kTokens * cfg.hidden_size);
    for (std::size_t i = 0; i < x.size(); ++i)
      x[i] = std::sin(0.01f * static_cast<float>(i + x.size() * static_cast<std::size_t>(world.rank())));
    auto const y = moe.forward(x);
    auto const dx = moe.backward(y);  // the gradient of ½‖y‖²

    auto params = moe.parameters();
    // dense over dp_cp, experts over edp, router also over tp
    moefold::reduce_gradients(moefold::Cpu{}, params, groups);
    double const norm = moefold::global_grad_norm(moefold::Cpu{}, params, groups);

    double checksum = 0;
    for (float v : y) checksum += v;
    std::vector<double> total{checksum};
    world.all_reduce(std::span<double>(total));

    std::lock_guard lk(print);
    if (world.rank() == 0)
      fmt::print("output checksum {:.6f}, gradient norm {:.6f}, aux loss {:.5f}\n", total[0], norm,
                 moe.aux_loss());
    auto const& meta = moe.dispatch_metadata();
    fmt::print("rank {}: {} rows for my {} experts; sent over ep {} B, etp {} B, tp_ep {} B\n",
               world.rank(), meta.num_expert_rows(), meta.num_local_experts,
               groups.ep().traffic().total_sent(), groups.etp().traffic().total_sent(),
               groups.tp_ep().traffic().total_sent());
  });
  return 0;
}
