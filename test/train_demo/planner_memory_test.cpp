// The planner's memory model against the library: for the demo model (the JSON file
// examples/plan/moefold-train-demo.json describes moefold-train's default model), `moefold plan
// --explain --json --runtime moefold` predicts the bytes of weights, gradients and optimizer
// state of every pipeline stage, and moefold-train counts what it allocates (memory.json, every
// rank). The largest rank of each stage must agree within 5%, with and without the distributed
// optimizer, with one and two optimizer instances. (scripts/planner-memory.sh prints the table.)

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "support/catch.hpp"
#include "support/run_command.hpp"

#if defined(MOEFOLD_CLI) && defined(MOEFOLD_PLAN_EXAMPLES)

using moefold::test::run_command;
namespace fs = std::filesystem;

namespace {

struct Folding {
  std::string sizes;      // moefold-train's and moefold plan's size flags
  std::string optimizer;  // "" or the distributed optimizer's flags
};

/// Runs moefold-train and the planner on `f` and checks every stage's three figures.
void check_folding(Folding const& f) {
  fs::path const dir =
      fs::temp_directory_path() / fmt::format("moefold_planner_memory_{}", ::getpid());
  fs::remove_all(dir);
  // Memory does not depend on the batch: a short step.
  std::string const batch = "--seq-length 32 --global-batch-size 8 --micro-batch-size 1";
  auto const train =
      run_command(fmt::format("{} {} {} {} --train-iters 1 --eval-iters 0 --quiet --output-dir {}",
                              MOEFOLD_TRAIN, f.sizes, f.optimizer, batch, dir.string()));
  INFO(f.sizes << " " << f.optimizer << "\nmoefold-train stderr: " << train.err);
  REQUIRE(train.status == 0);
  auto const plan = run_command(fmt::format(
      "{} plan --explain --json --model {}/moefold-train-demo.json {} {} {} --fp32 --runtime "
      "moefold",
      MOEFOLD_CLI, MOEFOLD_PLAN_EXAMPLES, f.sizes, batch,
      f.optimizer.empty() ? "--no-use-distributed-optimizer" : f.optimizer));
  INFO("moefold plan stderr: " << plan.err);
  REQUIRE(plan.status == 0);
  auto const library = nlohmann::json::parse(std::ifstream(dir / "memory.json"));
  auto const stages = nlohmann::json::parse(plan.out).at("state_per_stage_bytes");
  REQUIRE(stages.size() == library.at("pp").get<std::size_t>());
  for (std::size_t s = 0; s < stages.size(); ++s) {
    for (auto const& [key, lib_key] : {std::pair{"weights", "parameters"},
                                       {"gradients", "gradients"},
                                       {"optimizer", "optimizer"}}) {
      double measured = 0;
      for (auto const& r : library.at("ranks"))
        if (r.at("pp_rank").get<std::size_t>() == s)
          measured = std::max(measured, r.at(lib_key).get<double>());
      double const predicted = stages[s].at(key).get<double>();
      INFO("stage " << s << " " << key << ": planner " << predicted << " B, library " << measured
                    << " B");
      REQUIRE(measured > 0);
      CHECK(std::abs(predicted - measured) / measured <= 0.05);
    }
  }
  fs::remove_all(dir);
}

}  // namespace

TEST_CASE("the planner's weights, gradients and optimizer state per stage are moefold-train's",
          "[train][plan]") {
  // Folded (ETP ≠ TP, EDP 2), both optimizers; PP 1 (embedding and output layer on one stage)
  // sharded over DP 2; two optimizer instances (intra-partial groups of DP·CP 2 and EDP 1).
  std::string const dist = "--use-distributed-optimizer";
  for (Folding const& f : {Folding{"--world-size 8 --tp 2 --cp 2 --pp 2 --ep 2 --etp 1", ""},
                           Folding{"--world-size 8 --tp 2 --cp 2 --pp 2 --ep 2 --etp 1", dist},
                           Folding{"--world-size 4 --tp 2 --cp 1 --pp 1 --ep 2 --etp 2", dist},
                           Folding{"--world-size 8 --tp 1 --cp 1 --pp 2 --ep 2 --etp 1",
                                   dist + " --num-distributed-optimizer-instances 2"}}) {
    DYNAMIC_SECTION(f.sizes << " " << f.optimizer) { check_folding(f); }
  }
}

#endif
