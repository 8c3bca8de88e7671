// moefold-train as a specification: the same seed gives the same losses under every folding
// (DESIGN §3's contract, here for whole training steps); checkpoints resume bit-identically under
// the same folding and within 1e-4 under another; a corrupted or truncated checkpoint is refused
// and nothing is written; invalid flags exit with status 2 and one line; under mpiexec the losses
// equal the in-process run's.

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "support/catch.hpp"
#include "support/run_command.hpp"

using moefold::test::run_command;
namespace fs = std::filesystem;

namespace {

// A small model and few steps, so that every run takes about a second on 2 cores.
std::string const kSmall =
    "--num-layers 4 --hidden-size 64 --num-attention-heads 8 --num-query-groups 4 "
    "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 64 --seq-length 32 "
    "--global-batch-size 8 --micro-batch-size 1 --lr 3e-3 --seed 7 --eval-iters 1 --quiet";

fs::path scratch(std::string const& name) {
  fs::path const p =
      fs::temp_directory_path() / fmt::format("moefold_train_test_{}_{}", ::getpid(), name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

struct StepLog {
  std::int64_t step = 0;
  double loss = 0;
  std::string loss_text;  // as printed, to compare bit-identical runs
};

std::vector<StepLog> read_log(fs::path const& file) {
  std::vector<StepLog> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    auto const j = nlohmann::json::parse(line);
    auto const at = line.find("\"loss\": ") + 8;
    out.push_back({j.at("step").get<std::int64_t>(), j.at("loss").get<double>(),
                   line.substr(at, line.find(',', at) - at)});
  }
  return out;
}

/// Runs moefold-train with `args` (plus the small model) and returns its per-step log.
std::vector<StepLog> train(std::string const& args, fs::path const& dir, std::string const& tag) {
  auto const log = dir / (tag + ".jsonl");
  auto const r = run_command(fmt::format("{} {} {} --output-dir {} --log-json {}", MOEFOLD_TRAIN,
                                         kSmall, args, (dir / tag).string(), log.string()));
  INFO(args << "\nstderr: " << r.err);
  REQUIRE(r.status == 0);
  return read_log(log);
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-30); }

void expect_same_losses(std::vector<StepLog> const& got, std::vector<StepLog> const& want,
                        double tolerance) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    CHECK(got[i].step == want[i].step);
    worst = std::max(worst, rel(got[i].loss, want[i].loss));
  }
  INFO("largest relative difference " << worst);
  CHECK(worst <= tolerance);
}

std::string slurp(fs::path const& f) {
  std::ifstream in(f, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("every folding trains with the serial run's losses for 10 steps", "[train][folding]") {
  auto const dir = scratch("foldings");
  auto const serial = train("--world-size 1 --train-iters 10", dir, "serial");
  REQUIRE(serial.size() == 10);
  CHECK(serial.back().loss < serial.front().loss);
  for (std::string const folding :
       {"",  // the default: TP2·CP2·PP2 (DP1) / EP4·ETP1
        "--tp 2 --cp 2 --pp 2 --ep 4 --etp 1", "--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2",
        "--tp 2 --pp 2 --world-size 8 --ep 4", "--tp 2 --cp 2 --pp 2 --ep 2 --etp 2",
        "--tp 2 --pp 2 --world-size 8 --ep 2 --num-virtual-stages-per-pipeline-rank 2"}) {
    INFO("folding: " << (folding.empty() ? "default" : folding));
    auto const tag = fmt::format("f{}", std::hash<std::string>{}(folding) % 100000);
    expect_same_losses(train(folding + " --train-iters 10", dir, tag), serial, 1e-4);
  }
  fs::remove_all(dir);
}

TEST_CASE(
    "router options train with the serial run's losses for 10 steps under PP, VPP, CP, DP "
    "and ETP foldings",
    "[train][folding][router]") {
  auto const dir = scratch("router_modes");
  struct Mode {
    std::string flags;
    std::vector<std::string> foldings;
  };
  std::string const dp1 = "--tp 2 --cp 2 --pp 2 --ep 2 --etp 2";
  std::string const dp1_vpp =
      "--tp 2 --cp 2 --pp 2 --ep 4 --num-virtual-stages-per-pipeline-rank 2";
  std::string const dp4 = "--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2";
  std::string const dp2_vpp =
      "--tp 2 --pp 2 --world-size 8 --ep 2 --num-virtual-stages-per-pipeline-rank 2";
  std::vector<Mode> const modes = {
      // (a) aux-loss-free balancing: expert bias needs the sigmoid score, as in Megatron.
      {"--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
       "--moe-aux-loss-coeff 0",
       {"", dp1, dp4, dp2_vpp}},
      // (b) sequence-level and global aux losses with z-loss. Megatron reduces the global aux
      // loss's counts over tp_dp_cp, so its value depends on DP: DP 1 foldings only.
      {"--moe-router-load-balancing-type seq_aux_loss global_aux_loss --moe-aux-loss-coeff 0.01 "
       "0.01 --moe-z-loss-coeff 1e-3",
       {"", dp1, dp1_vpp}},
      // (b') the local aux losses with z-loss, under DP > 1 too.
      {"--moe-router-load-balancing-type aux_loss seq_aux_loss --moe-aux-loss-coeff 0.01 0.01 "
       "--moe-z-loss-coeff 1e-3",
       {dp4, dp2_vpp}},
      // Input jitter: a function of (seed, step, layer, global token, feature).
      {"--moe-input-jitter-eps 0.1", {dp1_vpp, dp4}},
  };
  for (auto const& mode : modes) {
    INFO("mode: " << mode.flags);
    auto const tag = fmt::format("m{}", std::hash<std::string>{}(mode.flags) % 100000);
    auto const serial = train(mode.flags + " --world-size 1 --train-iters 10", dir, tag);
    REQUIRE(serial.size() == 10);
    CHECK(serial.back().loss < serial.front().loss);
    for (auto const& folding : mode.foldings) {
      INFO("folding: " << (folding.empty() ? "default" : folding));
      expect_same_losses(train(mode.flags + " " + folding + " --train-iters 10", dir,
                               tag + fmt::format("f{}", std::hash<std::string>{}(folding) % 1000)),
                         serial, 1e-4);
    }
  }
  // Per-token-loss mode trains like the default mode on unmasked data.
  expect_same_losses(
      train("--calculate-per-token-loss " + dp2_vpp + " --train-iters 10", dir, "pt"),
      train("--world-size 1 --train-iters 10", dir, "pt_ref"), 1e-5);
  fs::remove_all(dir);
}

TEST_CASE("a checkpoint resumes bit-identically, and within 1e-4 under another folding",
          "[train][checkpoint]") {
  auto const dir = scratch("resume");
  auto const ckpt = (dir / "ckpt").string();
  auto const full =
      train("--train-iters 6 --save " + ckpt + " --save-interval 3", dir, "full");  // default fold
  REQUIRE(full.size() == 6);
  CHECK(fs::exists(fs::path(ckpt) / "iter_0000003" / "metadata.json"));
  CHECK(slurp(fs::path(ckpt) / "latest_checkpointed_iteration.txt") == "6\n");
  std::vector<StepLog> const tail(full.begin() + 3, full.end());

  auto const same = train("--train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, "same");
  REQUIRE(same.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(same[i].step == tail[i].step);
    CHECK(same[i].loss_text == tail[i].loss_text);  // bit-identical
  }

  for (std::string const folding :
       {"--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2", "--world-size 1",
        "--tp 2 --pp 2 --world-size 8 --ep 2 --num-virtual-stages-per-pipeline-rank 2"}) {
    INFO("resumed under " << folding);
    auto const tag = fmt::format("r{}", std::hash<std::string>{}(folding) % 100000);
    expect_same_losses(
        train(folding + " --train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, tag), tail,
        1e-4);
  }
  fs::remove_all(dir);
}

TEST_CASE("a corrupted or truncated checkpoint is refused and nothing is written",
          "[train][checkpoint]") {
  auto const dir = scratch("corrupt");
  auto const ckpt = dir / "ckpt";
  train("--world-size 2 --tp 2 --train-iters 2 --save " + ckpt.string(), dir, "save");
  auto const rank_file = ckpt / "iter_0000002" / "rank_00001.bin";
  REQUIRE(fs::exists(rank_file));

  struct Damage {
    char const* what;
    char const* expected;
  };
  for (auto const damage : {Damage{"flip", "corrupted"}, Damage{"truncate", "truncated"}}) {
    INFO(damage.what);
    auto bytes = slurp(rank_file);
    auto const original = bytes;
    if (std::string(damage.what) == "flip")
      bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x5a);
    else
      bytes.resize(bytes.size() - 100);
    std::ofstream(rank_file, std::ios::binary | std::ios::trunc) << bytes;
    auto const before = slurp(rank_file);
    auto const out = dir / "resumed";
    auto const log = dir / "resumed.jsonl";
    auto const r = run_command(fmt::format(
        "{} {} --world-size 2 --tp 2 --train-iters 4 --load {} --save {} --output-dir {} "
        "--log-json {}",
        MOEFOLD_TRAIN, kSmall, ckpt.string(), ckpt.string(), out.string(), log.string()));
    INFO("stderr: " << r.err);
    CHECK(r.status != 0);
    CHECK(r.err.find(damage.expected) != std::string::npos);
    CHECK(r.err.find("rank_00001.bin") != std::string::npos);
    CHECK(slurp(rank_file) == before);  // nothing overwritten
    CHECK_FALSE(fs::exists(ckpt / "iter_0000003"));
    CHECK(slurp(ckpt / "latest_checkpointed_iteration.txt") == "2\n");
    CHECK_FALSE(fs::exists(out));
    CHECK_FALSE(fs::exists(log));
    std::ofstream(rank_file, std::ios::binary | std::ios::trunc) << original;
  }
  fs::remove_all(dir);
}

TEST_CASE("invalid flag combinations exit with status 2 and one line", "[train][cli]") {
  for (std::string const args :
       {"--tp 3 --world-size 3",                // heads 8 not divisible by TP 3
        "--world-size 6 --tp 2 --cp 2 --pp 2",  // world does not match the folding
        "--backend nccl", "--backend tcp", "--num-layers 3 --pp 2 --world-size 2",
        "--tp 2 --pp 2 --world-size 4 --num-virtual-stages-per-pipeline-rank 2 "
        "--global-batch-size 3",
        "--world-size 1 --no-such-flag 1", "--world-size 1 --ep 3 --num-experts 8",
        "--world-size 1 --moe-router-score-function relu",
        "--world-size 1 --moe-router-load-balancing-type aux_los",
        "--world-size 1 --moe-router-enable-expert-bias",            // needs the sigmoid score
        "--world-size 1 --moe-router-load-balancing-type sinkhorn",  // aux coefficient 0.01
        "--world-size 1 --moe-router-load-balancing-type aux_loss seq_aux_loss "
        "--moe-aux-loss-coeff 0.1 0.2 0.3",
        "--world-size 1 --moe-z-loss-coeff -1", "--world-size 1 --moe-input-jitter-eps 1.5"}) {
    INFO(args);
    auto const r = run_command(fmt::format("{} {} {}", MOEFOLD_TRAIN, kSmall, args));
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(r.out.empty());
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.rfind("moefold-train: ", 0) == 0);
  }
}

#ifdef MOEFOLD_MPIEXEC
TEST_CASE("mpiexec -n 8 with --backend mpi gives the in-process run's losses", "[.mpi]") {
  auto const dir = scratch("mpi");
  auto const inproc = train("--train-iters 5", dir, "inproc");
  auto const log = dir / "mpi.jsonl";
  auto const r = run_command(
      fmt::format("{} -n 8 {} --backend mpi {} --train-iters 5 "
                  "--output-dir {} --log-json {}",
                  MOEFOLD_MPIEXEC, MOEFOLD_TRAIN, kSmall, (dir / "mpi").string(), log.string()));
  INFO("stderr: " << r.err);
  REQUIRE(r.status == 0);
  expect_same_losses(read_log(log), inproc, 1e-4);
  fs::remove_all(dir);
}
#endif
