// moefold-train as a specification: the same seed gives the same losses under every folding
// (DESIGN §3's contract, here for whole training steps); checkpoints resume bit-identically under
// the same folding and within 1e-4 under another; a corrupted or truncated checkpoint is refused
// and nothing is written; invalid flags exit with status 2 and one line; under mpiexec the losses
// equal the in-process run's.

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
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

/// Resumes `ckpt` at step 3 under each of `runs` (to step 6): the losses are `tail`'s (≤ 1e-4).
void expect_resumes(std::vector<std::string> const& runs, std::string const& ckpt,
                    std::vector<StepLog> const& tail, fs::path const& dir) {
  for (auto const& run : runs) {
    INFO("resumed under " << run);
    auto const tag = fmt::format("r{}", std::hash<std::string>{}(run) % 100000);
    expect_same_losses(train(run + " --train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, tag),
                       tail, 1e-4);
  }
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
        "--tp 2 --pp 2 --world-size 8 --ep 2 --num-virtual-stages-per-pipeline-rank 2",
        "--recompute-granularity full"}) {
    INFO("folding: " << (folding.empty() ? "default" : folding));
    auto const tag = fmt::format("f{}", std::hash<std::string>{}(folding) % 100000);
    expect_same_losses(train(folding + " --train-iters 10", dir, tag), serial, 1e-4);
  }
  fs::remove_all(dir);
}

TEST_CASE(
    "moefold-train's --add-qkv-bias and --rotary-base 1000000 train with the serial "
    "run's losses under TP2·CP2·PP2/EP4, and change them",
    "[train][folding][qkv_bias]") {
  auto const dir = scratch("qkv_bias");
  std::string const model =
      "--add-qkv-bias --rotary-base 1000000 --norm-epsilon 1e-6 --train-iters 4";
  auto const serial = train("--world-size 1 " + model, dir, "serial");
  expect_same_losses(train(model, dir, "folded"), serial, 1e-4);
  // The flags reach the model: the default model trains to other losses.
  auto const plain = train("--world-size 1 --train-iters 4", dir, "plain");
  CHECK(rel(plain[3].loss, serial[3].loss) > 1e-6);
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
  CHECK(fs::exists(fs::path(ckpt) / "iter_0000003" / "metadata.txt"));
  CHECK(slurp(fs::path(ckpt) / "latest_checkpointed_iteration.txt") == "6\n");
  std::vector<StepLog> const tail(full.begin() + 3, full.end());

  auto const same = train("--train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, "same");
  REQUIRE(same.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(same[i].step == tail[i].step);
    CHECK(same[i].loss_text == tail[i].loss_text);  // bit-identical
  }

  expect_resumes({"--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2", "--world-size 1",
                  "--tp 2 --pp 2 --world-size 8 --ep 2 --num-virtual-stages-per-pipeline-rank 2"},
                 ckpt, tail, dir);
  fs::remove_all(dir);
}

TEST_CASE("the distributed optimizer trains with AdamW's losses, and its checkpoint resumes "
          "under another folding with or without it",
          "[train][checkpoint][distopt]") {
  auto const dir = scratch("distopt");
  auto const ckpt = (dir / "ckpt").string();
  std::string const folding = "--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2 --train-iters 6";  // DP 4, EDP 2
  auto const plain = train(folding, dir, "plain");
  auto const sharded = train(folding +
                                 " --use-distributed-optimizer "
                                 "--num-distributed-optimizer-instances 2 --save " +
                                 ckpt + " --save-interval 3",
                             dir, "sharded");
  expect_same_losses(sharded, plain, 1e-5);
  // Per-token-loss mode divides the reduced shards by the global token count.
  std::string const per_token = "--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2 --train-iters 3 "
                                "--calculate-per-token-loss";
  expect_same_losses(train(per_token + " --use-distributed-optimizer", dir, "pt_sharded"),
                     train(per_token, dir, "pt_plain"), 1e-5);
  std::vector<StepLog> const tail(sharded.begin() + 3, sharded.end());
  expect_resumes({"--world-size 1", "--world-size 1 --use-distributed-optimizer",
                  "--tp 2 --cp 2 --pp 2 --ep 2 --etp 1 --use-distributed-optimizer"},
                 ckpt, tail, dir);
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

namespace {
/// The names in directory `d`, sorted.
std::vector<std::string> names_in(fs::path const& d) {
  std::vector<std::string> out;
  for (auto const& e : fs::directory_iterator(d)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// Runs moefold-train with the small model, `from` in its flags replaced by `to`, and `args`.
moefold::test::CommandResult train_raw(std::string const& from, std::string const& to,
                                       std::string const& args, fs::path const& out) {
  std::string flags = kSmall;
  if (!from.empty()) flags.replace(flags.find(from), from.size(), to);
  return run_command(fmt::format("{} {} {} --output-dir {}", MOEFOLD_TRAIN, flags, args,
                                 out.string()));
}
}  // namespace

TEST_CASE("saves of one iteration under two foldings into one directory never mix",
          "[train][checkpoint]") {
  auto const dir = scratch("mix");
  auto const mixed = (dir / "mixed").string(), clean = (dir / "clean").string();
  // Iteration 3 from 8 ranks with other optimizer settings (other weights), then from 1 rank.
  train("--train-iters 3 --weight-decay 0.5 --clip-grad 0.05 --save " + mixed, dir, "eight");
  train("--world-size 1 --train-iters 3 --save " + mixed, dir, "one");
  train("--world-size 1 --train-iters 3 --save " + clean, dir, "clean");
  CHECK(names_in(fs::path(mixed) / "iter_0000003") ==
        std::vector<std::string>{"metadata.txt", "rank_00000.bin"});
  auto const from_mixed = train("--world-size 1 --train-iters 5 --load " + mixed, dir, "rm");
  auto const from_clean = train("--world-size 1 --train-iters 5 --load " + clean, dir, "rc");
  REQUIRE(from_mixed.size() == 2);
  REQUIRE(from_clean.size() == 2);
  for (std::size_t i = 0; i < 2; ++i)
    CHECK(from_mixed[i].loss_text == from_clean[i].loss_text);  // the 1-rank save, whole
  fs::remove_all(dir);
}

TEST_CASE("a checkpoint of another model, or a latest file that is not an integer, is refused",
          "[train][checkpoint]") {
  auto const dir = scratch("refused");
  auto const ckpt = dir / "ckpt";
  train("--world-size 1 --train-iters 1 --save " + ckpt.string(), dir, "save");

  auto r = train_raw("--num-layers 4", "--num-layers 2",
                     "--world-size 1 --train-iters 2 --load " + ckpt.string(), dir / "o1");
  INFO("stderr: " << r.err);
  CHECK(r.status == 1);
  CHECK(r.err.find("checkpoint has num_layers = 4, the model 2") != std::string::npos);

  r = train_raw("--moe-router-topk 2", "--moe-router-topk 1 --moe-router-pre-softmax",
                "--world-size 1 --train-iters 2 --load " + ckpt.string(), dir / "o2");
  CHECK(r.status == 1);
  CHECK(r.err.find("checkpoint has moe_router_topk = 2, the model 1") != std::string::npos);

  std::ofstream(ckpt / "latest_checkpointed_iteration.txt", std::ios::trunc) << "1abc\n";
  r = train_raw("", "", "--world-size 1 --train-iters 2 --load " + ckpt.string(), dir / "o3");
  CHECK(r.status == 1);
  CHECK(r.err.find("latest_checkpointed_iteration.txt must hold exactly an iteration number, "
                   "but holds '1abc\\n'") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "o3"));
  fs::remove_all(dir);
}

TEST_CASE("moefold-train --keep-last N keeps the newest N iterations", "[train][checkpoint]") {
  auto const dir = scratch("keep");
  auto const ckpt = dir / "ckpt";
  train("--world-size 1 --train-iters 5 --save-interval 1 --keep-last 2 --save " + ckpt.string(),
        dir, "keep");
  CHECK(names_in(ckpt) == std::vector<std::string>{"iter_0000004", "iter_0000005",
                                                   "latest_checkpointed_iteration.txt"});
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
        "--world-size 1 --num-distributed-optimizer-instances 2",  // needs the flag below
        "--world-size 1 --use-distributed-optimizer --num-distributed-optimizer-instances 2",
        "--world-size 1 --moe-router-score-function relu",
        "--world-size 1 --moe-router-load-balancing-type aux_los",
        "--world-size 1 --moe-router-enable-expert-bias",            // needs the sigmoid score
        "--world-size 1 --moe-router-load-balancing-type sinkhorn",  // aux coefficient 0.01
        "--world-size 1 --moe-router-load-balancing-type aux_loss seq_aux_loss "
        "--moe-aux-loss-coeff 0.1 0.2 0.3",
        "--world-size 1 --moe-z-loss-coeff -1", "--world-size 1 --moe-input-jitter-eps 1.5",
        "--world-size 1 --moe-router-dtype bf16"}) {  // fp32 or fp64 (unset: the input dtype)
    INFO(args);
    auto const r = run_command(fmt::format("{} {} {}", MOEFOLD_TRAIN, kSmall, args));
    INFO("stderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(r.out.empty());
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.rfind("moefold-train: ", 0) == 0);
  }
}

namespace {

/// The small model with `from` in its flags replaced by `to`, then `args`; output in dir/tag.
moefold::test::CommandResult run_small(std::string const& from, std::string const& to,
                                       std::string const& args, fs::path const& dir,
                                       std::string const& tag) {
  std::string flags = kSmall;
  if (!from.empty()) flags.replace(flags.find(from), from.size(), to);
  return run_command(fmt::format("{} {} {} --output-dir {} --log-json {}", MOEFOLD_TRAIN, flags,
                                 args, (dir / tag).string(), (dir / (tag + ".jsonl")).string()));
}

/// The steps of loss.csv, in order.
std::vector<std::int64_t> csv_steps(fs::path const& csv) {
  std::vector<std::int64_t> out;
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);
  CHECK(line == "step,loss,aux_loss,validation_loss,lr,grad_norm,seconds,tokens_per_s");
  while (std::getline(in, line)) out.push_back(std::stoll(line.substr(0, line.find(','))));
  return out;
}

std::vector<std::int64_t> steps_of(std::vector<StepLog> const& log) {
  std::vector<std::int64_t> out;
  for (auto const& s : log) out.push_back(s.step);
  return out;
}

}  // namespace

TEST_CASE("with --eval-iters 0 no validation runs and no verdict is printed", "[train][report]") {
  auto const dir = scratch("no_eval");
  auto const r =
      run_small("--eval-iters 1", "--eval-iters 0", "--world-size 1 --train-iters 2", dir, "run");
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("validation loss") == std::string::npos);
  CHECK(r.out.find("baseline") == std::string::npos);
  CHECK(r.out.find("validation           none (--eval-iters 0)") != std::string::npos);
  CHECK(r.out.find("final train loss") != std::string::npos);
  // Throughput as Megatron logs it, and MFU against the GEMM rate measured at start-up.
  CHECK(r.out.find("GFLOP per step by Megatron's formula") != std::string::npos);
  CHECK(r.out.find("  MFU  ") != std::string::npos);
  CHECK(csv_steps(dir / "run" / "loss.csv") == std::vector<std::int64_t>{1, 2});
  fs::remove_all(dir);
}

TEST_CASE("a resumed run appends to --log-json and loss.csv and a fresh run starts them anew",
          "[train][report][checkpoint]") {
  auto const dir = scratch("append");
  auto const ckpt = (dir / "ckpt").string();
  auto const full =
      train("--world-size 1 --train-iters 4 --save-interval 2 --save " + ckpt, dir, "log");
  REQUIRE(steps_of(full) == std::vector<std::int64_t>{1, 2, 3, 4});

  // Resumed from step 2 into the same files: steps 1–2 are kept, 3–4 written again.
  auto const resumed =
      train("--world-size 1 --train-iters 4 --load " + ckpt + " --ckpt-step 2", dir, "log");
  REQUIRE(steps_of(resumed) == std::vector<std::int64_t>{1, 2, 3, 4});
  for (std::size_t i = 0; i < 4; ++i) CHECK(resumed[i].loss_text == full[i].loss_text);
  CHECK(csv_steps(dir / "log" / "loss.csv") == std::vector<std::int64_t>{1, 2, 3, 4});

  // A fresh run into the same files starts them anew.
  auto const fresh = train("--world-size 1 --train-iters 1", dir, "log");
  CHECK(steps_of(fresh) == std::vector<std::int64_t>{1});
  CHECK(csv_steps(dir / "log" / "loss.csv") == std::vector<std::int64_t>{1});
  fs::remove_all(dir);
}

TEST_CASE("resuming at or past --train-iters runs no step and says so", "[train][report]") {
  auto const dir = scratch("no_step");
  auto const ckpt = (dir / "ckpt").string();
  train("--world-size 1 --train-iters 2 --save " + ckpt, dir, "save");
  for (int iters : {2, 1}) {
    auto const r =
        run_small("", "", fmt::format("--world-size 1 --train-iters {} --load {}", iters, ckpt),
                  dir, "resume");
    INFO("--train-iters " << iters << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.status == 0);
    CHECK(r.out.find(fmt::format("no step to run: the checkpoint is at step 2 >= --train-iters {}",
                                 iters)) != std::string::npos);
    CHECK(r.out.find("final train loss") == std::string::npos);
    CHECK(r.out.find("validation loss") != std::string::npos);  // of the loaded model
    CHECK(read_log(dir / "resume.jsonl").empty());
  }
  fs::remove_all(dir);
}

TEST_CASE("a --clip-grad of 0 means no clipping, as in Megatron", "[train]") {
  auto const dir = scratch("no_clip");
  auto const off = train("--world-size 1 --train-iters 4 --clip-grad 0", dir, "off");
  auto const huge = train("--world-size 1 --train-iters 4 --clip-grad 1e30", dir, "huge");
  REQUIRE(off.size() == 4);
  REQUIRE(huge.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) CHECK(off[i].loss_text == huge[i].loss_text);
  fs::remove_all(dir);
}

TEST_CASE(
    "a non-finite gradient norm stops training before the update, naming the step and the "
    "ranks, unless --no-check-for-nan-in-loss-and-grad",
    "[train][nan]") {
  auto const dir = scratch("nan");
  // A z-loss coefficient of 1e45 overflows the router's fp32 gradients in step 1.
  std::string const overflow = "--moe-z-loss-coeff 1e45 --train-iters 3";
  auto const checked = run_small("", "", "--world-size 1 " + overflow, dir, "checked");
  INFO("stderr: " << checked.err);
  CHECK(checked.status == 1);
  CHECK(std::regex_search(checked.err,
                          std::regex("step 1 on rank 0: the loss is [0-9.]+ and the gradient norm "
                                     "is -?(nan|inf); the gradients are not finite on rank 0 ")));
  CHECK(checked.err.find("--no-check-for-nan-in-loss-and-grad") != std::string::npos);
  CHECK(read_log(dir / "checked.jsonl").empty());  // step 1 was not applied

  // Under 8 ranks every rank holds a non-finite router gradient.
  auto const folded = run_small("", "", overflow, dir, "folded");
  INFO("stderr: " << folded.err);
  CHECK(folded.status == 1);
  CHECK(folded.err.find("the gradients are not finite on rank 0, 1, 2, 3, 4, 5, 6, 7") !=
        std::string::npos);

  // Unchecked, step 1 is applied and logged (a NaN as JSON null); step 2's router then refuses
  // the NaN weights, naming the step (no validation in between).
  auto const unchecked =
      run_small("--eval-iters 1", "--eval-iters 0",
                "--world-size 1 --no-check-for-nan-in-loss-and-grad " + overflow, dir, "free");
  INFO("stderr: " << unchecked.err);
  std::ifstream in(dir / "free.jsonl");
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  REQUIRE_FALSE(lines.empty());
  CHECK(lines[0].at("step") == 1);
  CHECK(lines[0].at("grad_norm").is_null());
  CHECK(unchecked.status == 1);
  CHECK(unchecked.err.find("step 2 on rank 0: ") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("file errors name the file and the reason, and too big a model the memory it needs",
          "[train][cli]") {
  auto const dir = scratch("files");
  std::ofstream(dir / "plain") << "x";
  struct Bad {
    std::string from, args, expected;
  };
  for (auto const& bad : {
           Bad{"", "--data-path /proc/self/mem",
               "--data-path '/proc/self/mem': cannot read: " + std::string(std::strerror(EIO))},
           Bad{"", "--data-path " + (dir / "none").string(),
               fmt::format("'{}': {}", (dir / "none").string(), std::strerror(ENOENT))},
           Bad{"", "--save " + (dir / "plain" / "ckpt").string(),
               fmt::format("'{}' is not a directory", (dir / "plain").string())},
           Bad{"--hidden-size 64", "--hidden-size 1048576", "the run needs at least"},
       }) {
    auto const r = run_small(bad.from, bad.from.empty() ? "" : bad.args,
                             "--world-size 1 " + (bad.from.empty() ? bad.args : ""), dir, "out");
    INFO(bad.args << "\nstderr: " << r.err);
    CHECK(r.status == 2);
    CHECK(r.err.find(bad.expected) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  }
  CHECK_FALSE(fs::exists(dir / "out"));  // refused before any work
  fs::remove_all(dir);
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

TEST_CASE("the opt-in --check-activations-and-grads names the first layer whose output or "
          "gradient is not finite",
          "[train][nan]") {
  auto const dir = scratch("layer_check");
  auto const r = run_small("", "",
                           "--world-size 1 --check-activations-and-grads "
                           "--moe-z-loss-coeff 1e45 --train-iters 2",
                           dir, "layers");
  INFO("stderr: " << r.err);
  CHECK(r.status == 1);
  CHECK(std::regex_search(r.err, std::regex("non-finite input gradient \\(-?(nan|inf)\\) at "
                                            "element [0-9]+ of decoder\\.layers\\.3, microbatch "
                                            "[0-9]+, on world rank 0")));
  fs::remove_all(dir);
}

#ifdef MOEFOLD_CLI
TEST_CASE(
    "two --lr 0 runs saved under TP2·CP2·PP2/EP4 and under one rank convert to the same "
    "Hugging Face file, which converts back and trains with the same loss",
    "[train][checkpoint][hf]") {
  auto const dir = scratch("hf");
  std::string const small = "--lr 3e-3 --seed 7 --eval-iters 1";
  std::string const lr0 = "--lr 0 --min-lr 0 --seed 7 --eval-iters 0";
  auto const run = [&](std::string const& args, std::string const& tag) {
    auto const r = run_small(small, lr0, args, dir, tag);
    INFO(args << "\nstderr: " << r.err);
    REQUIRE(r.status == 0);
    return read_log(dir / (tag + ".jsonl"));
  };
  auto const convert = [&](std::string const& args) {
    return run_command(fmt::format("{} convert {}", MOEFOLD_CLI, args));
  };
  auto const folded =
      run(fmt::format("--train-iters 2 --save {}", (dir / "ckpt_folded").string()), "folded");
  auto const serial =
      run(fmt::format("--world-size 1 --train-iters 2 --save {}", (dir / "ckpt_serial").string()),
          "serial");
  for (char const* which : {"folded", "serial"}) {
    auto const r =
        convert(fmt::format("--to hf {} {}", (dir / fmt::format("ckpt_{}", which)).string(),
                            (dir / fmt::format("hf_{}", which)).string()));
    INFO(r.err);
    REQUIRE(r.status == 0);
  }
  auto const hf = slurp(dir / "hf_serial" / "model.safetensors");
  CHECK(hf.size() > 1000000);  // 4 layers of 8 experts: the weights are all there
  CHECK(hf == slurp(dir / "hf_folded" / "model.safetensors"));
  CHECK(slurp(dir / "hf_serial" / "config.json") == slurp(dir / "hf_folded" / "config.json"));

  // Back into a checkpoint of weights only: refused without --finetune, trained with it.
  auto const back = (dir / "ckpt_back").string();
  REQUIRE(convert(fmt::format("--from hf {} {}", (dir / "hf_folded").string(), back)).status == 0);
  auto const plain =
      run_small(small, lr0, "--world-size 1 --train-iters 1 --load " + back, dir, "plain");
  CHECK(plain.status == 1);
  CHECK(plain.err.find("holds weights only, no optimizer state") != std::string::npos);
  CHECK(plain.err.find("--finetune or --no-load-optim") != std::string::npos);
  // Iteration 0 with the same weights: step 1 has the same loss, to the last digit.
  auto const tuned = run("--world-size 1 --train-iters 1 --finetune --load " + back, "tuned");
  REQUIRE(tuned.size() == 1);
  CHECK(tuned[0].loss_text == serial[0].loss_text);
  // --finetune starts at iteration 0 from any iteration (here 2; --lr 0 kept the weights).
  auto const again =
      run("--world-size 1 --train-iters 1 --finetune --load " + (dir / "ckpt_serial").string(),
          "again");
  REQUIRE(again.size() == 1);
  CHECK(again[0].step == 1);
  CHECK(again[0].loss_text == serial[0].loss_text);
  // --no-load-optim continues at the checkpoint's iteration with fresh moments.
  auto const resumed =
      run("--world-size 1 --train-iters 3 --no-load-optim --load " + (dir / "ckpt_serial").string(),
          "resumed");
  REQUIRE(resumed.size() == 1);
  CHECK(resumed[0].step == 3);
  CHECK(folded.size() == 2);
  fs::remove_all(dir);
}

TEST_CASE("moefold convert refuses a model Mixtral cannot express and bad usage, naming why",
          "[train][checkpoint][hf]") {
  auto const dir = scratch("hf_refused");
  auto const r = run_small("--eval-iters 1", "--eval-iters 0",
                           fmt::format("--world-size 1 --train-iters 1 "
                                       "--moe-shared-expert-intermediate-size 32 --save {}",
                                       (dir / "ckpt").string()),
                           dir, "shared");
  REQUIRE(r.status == 0);
  auto const convert = [&](std::string const& args) {
    return run_command(fmt::format("{} convert {}", MOEFOLD_CLI, args));
  };
  auto const shared =
      convert(fmt::format("--to hf {} {}", (dir / "ckpt").string(), (dir / "hf").string()));
  CHECK(shared.status == 2);
  CHECK(shared.err.find("moe_shared_expert_intermediate_size = 32 "
                        "(--moe-shared-expert-intermediate-size): a shared expert; Mixtral "
                        "cannot express it") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "hf" / "model.safetensors"));
  auto const both = convert("--to hf --from hf a b");
  CHECK(both.status == 2);
  CHECK(both.err.find("exactly one of --to hf") != std::string::npos);
  auto const other = convert("--to gguf a b");
  CHECK(other.status == 2);
  CHECK(other.err.find("unknown format 'gguf'") != std::string::npos);
  auto const missing =
      convert(fmt::format("--from hf {} {}", (dir / "nowhere").string(), (dir / "x").string()));
  CHECK(missing.status == 2);
  CHECK(missing.err.find("config.json is missing") != std::string::npos);
  fs::remove_all(dir);
}
#endif

#ifdef MOEFOLD_SPM_TRAIN
TEST_CASE(
    "SentencePiece tokens train with the serial run's losses, on a padded vocabulary, and "
    "the summary reports bits per byte",
    "[train][tokenizer]") {
  auto const dir = scratch("sentencepiece");
  // A corpus and a unigram model of 512 pieces (bytes as fallback) made from moefold's docs.
  auto const corpus = dir / "corpus.txt";
  {
    std::ofstream out(corpus);
    for (auto const& f : fs::directory_iterator(fs::path(MOEFOLD_SOURCE_DIR) / "docs"))
      if (f.path().extension() == ".md") out << slurp(f.path());
  }
  auto const spm = run_command(
      fmt::format("{} --input={} --model_prefix={} --vocab_size=512 --model_type=unigram "
                  "--character_coverage=1.0 --byte_fallback=true --minloglevel=2",
                  MOEFOLD_SPM_TRAIN, corpus.string(), (dir / "sp").string()));
  INFO(spm.err);
  REQUIRE(spm.status == 0);
  std::string const sp = fmt::format(
      "--data-path {} --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model {} "
      "--train-iters 3",
      corpus.string(), (dir / "sp.model").string());
  auto const serial = train("--world-size 1 " + sp, dir, "serial");
  expect_same_losses(train(sp, dir, "folded"), serial, 1e-4);  // TP2·CP2·PP2/EP4
  // The banner and the summary (--quiet leaves them) with the padded vocabulary.
  auto const r =
      run_small("", "", "--world-size 1 --make-vocab-size-divisible-by 384 " + sp, dir, "padded");
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("(vocabulary 512, padded to 768)") != std::string::npos);
  CHECK(std::regex_search(r.out, std::regex("validation loss +[0-9.]+ nats per token")));
  CHECK(std::regex_search(r.out, std::regex("bits per byte +[0-9.]+ +byte-unigram entropy "
                                            "[0-9.]+ bits: .*bytes per token")));
  auto const bad = run_small(
      "", "", "--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model " + corpus.string(),
      dir, "bad");
  CHECK(bad.status == 2);
  CHECK(bad.err.find("not a SentencePiece model") != std::string::npos);
  fs::remove_all(dir);
}
#endif

// --bf16 (Megatron's mixed precision: bf16 parameters and activations, FP32 accumulation, loss,
// main gradients, main parameters and moments). The demo model's 50 steps on the folding below
// are checked by hand (docs/precision.md); here the small model, 10 steps.
TEST_CASE("moefold-train --bf16 trains within 2% of the FP32 run's losses (distributed optimizer, EDP 2), with each --moe-router-dtype",
          "[train][bf16]") {
  auto const dir = scratch("bf16");
  std::string const folding =
      "--tp 2 --cp 2 --pp 2 --ep 2 --etp 1 --use-distributed-optimizer --train-iters 10";
  auto const fp32 = train(folding, dir, "fp32");
  auto const bf16 = train(folding + " --bf16", dir, "bf16");
  expect_same_losses(bf16, fp32, 2e-2);
  CHECK(bf16.back().loss < bf16.front().loss);
  // Really another precision: the losses are not the FP32 run's to the last digit.
  auto const differs = [](auto const& a, auto const& b) {
    int same = 0;
    for (std::size_t i = 0; i < a.size(); ++i) same += a[i].loss_text == b[i].loss_text;
    return same < static_cast<int>(a.size());
  };
  CHECK(differs(bf16, fp32));
  // --moe-router-dtype: the default under --bf16 stores bf16 router logits, fp32 keeps FP32
  // ones (another run, within bf16 of FP32); fp64 computes the router in double (FP32 layers:
  // within the FP32 run's rounding).
  auto const bf16_fp32_router = train(folding + " --bf16 --moe-router-dtype fp32", dir, "b32");
  expect_same_losses(bf16_fp32_router, fp32, 2e-2);
  CHECK(differs(bf16_fp32_router, bf16));
  expect_same_losses(train(folding + " --moe-router-dtype fp64", dir, "fp64"), fp32, 1e-3);
  fs::remove_all(dir);
}

TEST_CASE("moefold-train --bf16: one rank and two 8-rank foldings agree within 1e-2 for 10 steps",
          "[train][bf16][folding]") {
  auto const dir = scratch("bf16_foldings");
  auto const serial = train("--bf16 --world-size 1 --train-iters 10", dir, "serial");
  for (std::string const folding :
       {"--tp 2 --cp 2 --pp 2 --ep 2 --etp 1", "--tp 1 --cp 1 --pp 2 --world-size 8 --ep 2"}) {
    INFO("folding: " << folding);
    auto const tag = fmt::format("f{}", std::hash<std::string>{}(folding) % 100000);
    expect_same_losses(train(folding + " --bf16 --train-iters 10", dir, tag), serial, 1e-2);
  }
  fs::remove_all(dir);
}

TEST_CASE("a --bf16 checkpoint resumes bit-identically in bf16 and in FP32 from its FP32 main "
          "parameters, an FP32 checkpoint resumes in bf16",
          "[train][bf16][checkpoint]") {
  auto const dir = scratch("bf16_resume");
  auto const ckpt = (dir / "bf16_ckpt").string(), ckpt32 = (dir / "fp32_ckpt").string();
  auto const full = train("--bf16 --train-iters 6 --save " + ckpt + " --save-interval 3", dir, "b");
  std::vector<StepLog> const tail(full.begin() + 3, full.end());
  auto const same = train("--bf16 --train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, "bb");
  REQUIRE(same.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) CHECK(same[i].loss_text == tail[i].loss_text);
  expect_same_losses(train("--train-iters 6 --load " + ckpt + " --ckpt-step 3", dir, "bf"), tail,
                     2e-2);
  auto const full32 = train("--train-iters 6 --save " + ckpt32 + " --save-interval 3", dir, "f");
  std::vector<StepLog> const tail32(full32.begin() + 3, full32.end());
  expect_same_losses(train("--bf16 --train-iters 6 --load " + ckpt32 + " --ckpt-step 3", dir, "fb"),
                     tail32, 2e-2);
  fs::remove_all(dir);
}
