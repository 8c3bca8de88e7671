// Checkpoints: shards saved under one folding load under another; files are atomic and
// checksummed; truncated, corrupted, incomplete or partial checkpoints are refused by name.

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/training_state.hpp"
#include "support/catch.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

fs::path scratch(std::string const& name) {
  auto const p = fs::temp_directory_path() / ("moefold_ckpt_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

double global_value(std::int64_t r, std::int64_t c) { return static_cast<double>(r * 100 + c) + 0.5; }

/// Rank `r` of `n` holds a column block (n_cols = 8 / n) of a 6×8 weight and, on rank 0 only,
/// a whole 1×8 norm; AdamW moments follow the same blocks.
struct Shards {
  Param<float> weight, norm;
  Shards(int r, int n)
      : weight("w", ParamClass::dense, 6, 8, {{.row0 = 0, .rows = 6, .col0 = r * 8 / n, .cols = 8 / n}}),
        norm(Param<float>::whole("n", ParamClass::tp_replicated, 1, 8)) {}
};

void save_world(fs::path const& dir, int n, std::int64_t step) {
  inproc::run(n, [&](inproc::Communicator& world) {
    Shards s(world.rank(), n);
    std::vector<double> g(48);
    for (auto* p : {&s.weight, &s.norm}) {
      std::size_t i = 0;
      for (auto const& b : p->blocks)
        for (std::int64_t r = 0; r < b.rows; ++r)
          for (std::int64_t c = 0; c < b.cols; ++c, ++i)
            p->value[i] = static_cast<float>(global_value(b.row0 + r, b.col0 + c));
    }
    AdamW<float> opt({&s.weight, &s.norm});
    for (std::size_t k = 0; k < 2; ++k)
      for (std::size_t i = 0; i < opt.exp_avg(k).size(); ++i) {
        opt.exp_avg(k)[i] = 1.0 + static_cast<double>(opt.params()[k]->value[i]);
        opt.exp_avg_sq(k)[i] = 2.0 * static_cast<double>(opt.params()[k]->value[i]);
      }
    opt.set_steps(step);
    bool const first = world.rank() == 0;
    auto entries = training_state_entries<float>(
        opt, [&](Param<float> const& p) { return p.name == "w" || first; }, first);
    save_checkpoint(world, dir, step, entries, "{\"world\": " + std::to_string(n) + "}");
  });
}

}  // namespace

TEST_CASE("a checkpoint saved by 4 ranks loads into 2 ranks with other blocks") {
  auto const dir = scratch("reshard");
  save_world(dir, 4, 7);
  CHECK(fs::exists(dir / "latest_checkpointed_iteration.txt"));
  CHECK(fs::exists(dir / "iter_0000007" / "metadata.json"));
  for (auto const& e : fs::directory_iterator(dir / "iter_0000007"))
    CHECK(e.path().string().find(".tmp.") == std::string::npos);  // atomic: no leftovers

  auto const ckpt = CheckpointReader::open(dir);  // the latest
  CHECK(ckpt.step() == 7);
  CHECK(ckpt.metadata() == "{\"world\": 4}");
  for (int r = 0; r < 2; ++r) {
    // Row blocks now (as if TP moved from columns to rows), plus the norm.
    Param<float> w("w", ParamClass::dense, 6, 8, {{.row0 = r * 3, .rows = 3, .col0 = 0, .cols = 8}});
    Param<float> n = Param<float>::whole("n", ParamClass::tp_replicated, 1, 8);
    AdamW<float> opt({&w, &n});
    restore_training_state(ckpt, opt);
    CHECK(opt.steps() == 7);
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t c = 0; c < 8; ++c) {
        auto const k = static_cast<std::size_t>(i * 8 + c);
        double const v = global_value(r * 3 + i, c);
        CHECK(w.value[k] == static_cast<float>(v));
        CHECK(opt.exp_avg(0)[k] == 1.0 + static_cast<double>(static_cast<float>(v)));
        CHECK(opt.exp_avg_sq(0)[k] == 2.0 * static_cast<double>(static_cast<float>(v)));
      }
    CHECK(n.value[3] == static_cast<float>(global_value(0, 3)));
  }
  fs::remove_all(dir);
}

TEST_CASE("truncated, corrupted, incomplete or partial checkpoints are refused by name") {
  auto const dir = scratch("broken");
  save_world(dir, 2, 3);
  auto const file = dir / "iter_0000003" / "rank_00001.bin";
  auto bytes = detail::read_file(file);

  SECTION("truncated") {
    std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("rank_00001.bin is truncated"));
  }
  SECTION("corrupted") {
    bytes[bytes.size() / 2] ^= 0x5a;
    std::ofstream(file, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("rank_00001.bin is corrupted (checksum mismatch)"));
  }
  SECTION("incomplete: no metadata") {
    fs::remove(dir / "iter_0000003" / "metadata.json");
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("is incomplete (no metadata.json)"));
  }
  SECTION("a rank file missing leaves elements uncovered") {
    fs::remove(file);
    auto const ckpt = CheckpointReader::open(dir);
    Param<float> w = Param<float>::whole("w", ParamClass::dense, 6, 8);
    std::vector<double> out(48);
    CHECK_THROWS_WITH(ckpt.fill("w", 6, 8, w.blocks, out), Contains("does not cover element (0, 4) of 'w'"));
  }
  SECTION("a tensor of another shape or name") {
    auto const ckpt = CheckpointReader::open(dir);
    std::vector<double> out(8);
    CHECK_THROWS_WITH(ckpt.fill("w", 1, 8, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 8}}, out),
                      Contains("'w' is 6×8 in the checkpoint but 1×8 here"));
    CHECK_THROWS_WITH(ckpt.fill("missing", 1, 8, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 8}}, out),
                      Contains("has no tensor 'missing'"));
  }
  SECTION("no checkpoint at all") {
    CHECK_THROWS_WITH(CheckpointReader::open(dir / "nowhere"), Contains("no checkpoint in"));
  }
  fs::remove_all(dir);
}
