// Checkpoints (format v2): shards saved under one folding load under another; tensors keep
// their dtype; truncated, corrupted, incomplete or partial checkpoints are refused by name.

#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/training_state.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

/// The optimizer's moment type (stored as it is typed).
using Moment =
    std::remove_cvref_t<decltype(std::declval<AdamW<test::Exec, float>&>().exp_avg(0))>::value_type;

fs::path scratch(std::string const& name) {
  auto const p =
      fs::temp_directory_path() / ("moefold_ckpt_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p;
}

std::string slurp(fs::path const& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void overwrite(fs::path const& p, std::string const& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

double global_value(std::int64_t r, std::int64_t c, double base) {
  return static_cast<double>(r * 100 + c) + base;
}

/// Rank `r` of `n` holds a column block (n_cols = 8 / n) of a 6×8 weight and, on rank 0 only,
/// a whole 1×8 norm; AdamW moments follow the same blocks.
struct Shards {
  Param<float> weight, norm;
  Shards(int r, int n)
      : weight("w", ParamClass::dense, 6, 8,
               {{.row0 = 0, .rows = 6, .col0 = r * 8 / n, .cols = 8 / n}}),
        norm(Param<float>::whole("n", ParamClass::tp_replicated, 1, 8)) {}
};

CheckpointInfo info_of(int world, int layers = 4) {
  CheckpointInfo info;
  info.folding.set("world_size", world);
  info.model.set("num_layers", layers).set("hidden_size", 8);
  info.run.set("seed", 7);
  return info;
}

/// Saves iteration `step` from `n` ranks; element (r, c) of every tensor is r·100 + c + base.
/// With `skip_rank1_weight`, rank 1 leaves its block of "w" out.
void save_world(fs::path const& dir, int n, std::int64_t step, double base = 0.5,
                CheckpointSaveOptions opts = {}, bool skip_rank1_weight = false) {
  inproc::run(n, [&](inproc::Communicator& world) {
    Shards s(world.rank(), n);
    for (auto* p : {&s.weight, &s.norm}) {
      std::size_t i = 0;
      for (auto const& b : p->blocks)
        for (std::int64_t r = 0; r < b.rows; ++r)
          for (std::int64_t c = 0; c < b.cols; ++c, ++i)
            p->value[i] = static_cast<float>(global_value(b.row0 + r, b.col0 + c, base));
    }
    AdamW<test::Exec, float> opt({&s.weight, &s.norm});
    for (std::size_t k = 0; k < 2; ++k)
      for (std::size_t i = 0; i < opt.exp_avg(k).size(); ++i) {
        opt.exp_avg(k)[i] = 1.0 + static_cast<double>(opt.params()[k]->value[i]);
        opt.exp_avg_sq(k)[i] = 2.0 * static_cast<double>(opt.params()[k]->value[i]);
      }
    opt.set_steps(step);
    bool const first = world.rank() == 0;
    auto entries = training_state_entries<test::Exec, float>(
        opt,
        [&](Param<float> const& p) {
          return (p.name == "w" && !(skip_rank1_weight && world.rank() == 1)) || first;
        },
        first);
    save_checkpoint(world, dir, step, entries, info_of(n), opts);
  });
}

/// Loads the whole "w" from `ckpt` and checks every element against `base`.
void expect_weight(CheckpointReader const& ckpt, double base) {
  std::vector<float> w(48);
  ckpt.fill("w", 6, 8, {{.row0 = 0, .rows = 6, .col0 = 0, .cols = 8}}, std::span<float>(w));
  for (std::int64_t r = 0; r < 6; ++r)
    for (std::int64_t c = 0; c < 8; ++c)
      CHECK(w[static_cast<std::size_t>(r * 8 + c)] == static_cast<float>(global_value(r, c, base)));
}

std::vector<std::string> entries_of(fs::path const& dir) {
  std::vector<std::string> out;
  for (auto const& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

TEST_CASE("a checkpoint saved by 4 ranks loads into 2 ranks with other blocks") {
  auto const dir = scratch("reshard");
  save_world(dir, 4, 7);
  CHECK(slurp(dir / "latest_checkpointed_iteration.txt") == "7\n");
  // Renamed into place whole: the iteration and nothing else, no temporaries.
  CHECK(entries_of(dir) ==
        std::vector<std::string>{"iter_0000007", "latest_checkpointed_iteration.txt"});
  CHECK(entries_of(dir / "iter_0000007") ==
        std::vector<std::string>{"metadata.txt", "rank_00000.bin", "rank_00001.bin",
                                 "rank_00002.bin", "rank_00003.bin"});

  auto const ckpt = CheckpointReader::open(dir);  // the latest
  CHECK(ckpt.step() == 7);
  CHECK(ckpt.metadata().info.folding.get("world_size") == "4");
  CHECK(ckpt.metadata().info.run.get("seed") == "7");
  for (int r = 0; r < 2; ++r) {
    // Row blocks now (as if TP moved from columns to rows), plus the norm.
    Param<float> w("w", ParamClass::dense, 6, 8,
                   {{.row0 = r * 3, .rows = 3, .col0 = 0, .cols = 8}});
    Param<float> n = Param<float>::whole("n", ParamClass::tp_replicated, 1, 8);
    AdamW<test::Exec, float> opt({&w, &n});
    restore_training_state(ckpt, opt);
    CHECK(opt.steps() == 7);
    for (std::int64_t i = 0; i < 3; ++i)
      for (std::int64_t c = 0; c < 8; ++c) {
        auto const k = static_cast<std::size_t>(i * 8 + c);
        double const v = global_value(r * 3 + i, c, 0.5);
        CHECK(w.value[k] == static_cast<float>(v));
        CHECK(opt.exp_avg(0)[k] == 1.0 + static_cast<double>(static_cast<float>(v)));
        CHECK(opt.exp_avg_sq(0)[k] == 2.0 * static_cast<double>(static_cast<float>(v)));
      }
    CHECK(n.value[3] == static_cast<float>(global_value(0, 3, 0.5)));
  }
  fs::remove_all(dir);
}

TEST_CASE("tensors are stored in their own dtype, tagged in the metadata") {
  auto const dir = scratch("dtype");
  save_world(dir, 2, 1);
  auto const ckpt = CheckpointReader::open(dir);
  auto const& t = ckpt.metadata().tensors;
  CHECK(t.at("w").dtype == DType::f32);
  CHECK(t.at("w.exp_avg").dtype == dtype_of<Moment>());
  CHECK(t.at("optimizer.steps").dtype == DType::i64);
  // Rank 1 holds a 6×4 block of w and its two moments: a 24-byte header, then raw elements.
  std::size_t const moment = size_of(dtype_of<Moment>());
  CHECK(fs::file_size(dir / "iter_0000001" / "rank_00001.bin") == 24 + 24 * (4 + 2 * moment));
  CHECK(slurp(dir / "iter_0000001" / "metadata.txt").find("tensor w float 6 8\n") !=
        std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("two saves of one iteration into one directory never mix") {
  auto const dir = scratch("mix");
  save_world(dir, 4, 3, /*base=*/0.5);
  save_world(dir, 1, 3, /*base=*/0.25);  // another folding, other values, same iteration
  CHECK(entries_of(dir / "iter_0000003") ==
        std::vector<std::string>{"metadata.txt", "rank_00000.bin"});
  expect_weight(CheckpointReader::open(dir), 0.25);

  SECTION("a file of another save in the directory is never read") {
    fs::copy_file(dir / "iter_0000003" / "rank_00000.bin", dir / "stray.bin");
    save_world(dir, 4, 3, /*base=*/0.75);
    // A stray file beside the listed ones is ignored...
    fs::copy_file(dir / "stray.bin", dir / "iter_0000003" / "rank_00007.bin");
    expect_weight(CheckpointReader::open(dir), 0.75);
    // ...and one in place of a listed file is refused (size or save id differ).
    fs::copy_file(dir / "stray.bin", dir / "iter_0000003" / "rank_00000.bin",
                  fs::copy_options::overwrite_existing);
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("rank_00000.bin"));
  }
  fs::remove_all(dir);
}

TEST_CASE("leftovers of an interrupted save are removed by the next save") {
  auto const dir = scratch("leftover");
  save_world(dir, 2, 1);
  // A crash mid-save leaves its temporary directory; one mid-swap an old iteration set aside;
  // one mid-latest a temporary latest file.
  fs::create_directories(dir / "iter_0000002.tmp.0123456789abcdef");
  overwrite(dir / "iter_0000002.tmp.0123456789abcdef" / "rank_00000.bin", "partial");
  fs::create_directories(dir / "iter_0000001.old.0123456789abcdef");
  overwrite(dir / "latest_checkpointed_iteration.txt.tmp.42", "2");
  // Loading ignores them.
  expect_weight(CheckpointReader::open(dir), 0.5);
  save_world(dir, 2, 2);
  CHECK(entries_of(dir) == std::vector<std::string>{"iter_0000001", "iter_0000002",
                                                    "latest_checkpointed_iteration.txt"});
  CHECK(entries_of(dir / "iter_0000002") ==
        std::vector<std::string>{"metadata.txt", "rank_00000.bin", "rank_00001.bin"});
  fs::remove_all(dir);
}

TEST_CASE("a save that fails on one rank fails on every rank and publishes nothing") {
  auto const dir = scratch("failed");
  save_world(dir, 2, 1);
  std::vector<std::string> errors(2);
  inproc::run(2, [&](inproc::Communicator& world) {
    std::vector<float> v(4, 1.0f);
    // Rank 1's entry claims 8 elements but has 4.
    std::int64_t const rows = world.rank() == 1 ? 2 : 1;
    try {
      save_checkpoint(world, dir, 2,
                      {ShardEntry::view(fmt::format("t{}", world.rank()), 2, 4,
                                        {{.row0 = 0, .rows = rows, .col0 = 0, .cols = 4}},
                                        std::span<float const>(v))},
                      info_of(2));
    } catch (error const& e) {
      errors[static_cast<std::size_t>(world.rank())] = e.what();
    }
  });
  for (auto const& e : errors)
    CHECK_THAT(e, Contains("failed on rank 1") && Contains("8 elements"));
  CHECK(entries_of(dir) ==
        std::vector<std::string>{"iter_0000001", "latest_checkpointed_iteration.txt"});
  CHECK(CheckpointReader::open(dir).step() == 1);
  fs::remove_all(dir);
}

TEST_CASE("keep_last keeps only the newest iterations") {
  auto const dir = scratch("keep");
  for (std::int64_t step : {1, 2, 3, 4, 5}) save_world(dir, 2, step, 0.5, {.keep_last = 2});
  CHECK(entries_of(dir) == std::vector<std::string>{"iter_0000004", "iter_0000005",
                                                    "latest_checkpointed_iteration.txt"});
  save_world(dir, 2, 6);  // 0: keep all
  CHECK(entries_of(dir).size() == 4);
  CHECK(CheckpointReader::open(dir).step() == 6);
  CHECK(CheckpointReader::open(dir, 4).step() == 4);
  fs::remove_all(dir);
}

TEST_CASE("a checkpoint of another model is refused naming the first differing setting") {
  auto const dir = scratch("model");
  save_world(dir, 1, 1);
  auto const ckpt = CheckpointReader::open(dir);
  CHECK_NOTHROW(ckpt.check_model(info_of(1, 4).model));
  CHECK_THROWS_WITH(ckpt.check_model(info_of(1, 2).model),
                    Contains("checkpoint has num_layers = 4, the model 2"));
  ConfigEntries more = info_of(1, 4).model;
  more.set("num_moe_experts", 8);
  CHECK_THROWS_WITH(ckpt.check_model(more),
                    Contains("does not record the model's num_moe_experts (the model has 8)"));
  ConfigEntries fewer;
  fewer.set("num_layers", 4);
  CHECK_THROWS_WITH(ckpt.check_model(fewer),
                    Contains("checkpoint has hidden_size = 8, which the model does not set"));
  fs::remove_all(dir);
}

TEST_CASE("latest_checkpointed_iteration.txt must hold exactly an integer") {
  auto const dir = scratch("latest");
  save_world(dir, 1, 3);
  auto const latest = dir / "latest_checkpointed_iteration.txt";
  for (std::string const bad : {"3abc\n", "", " 3", "-3", "3\n\n", "0x3"}) {
    INFO("latest holds '" << bad << "'");
    overwrite(latest, bad);
    CHECK_THROWS_WITH(CheckpointReader::open(dir),
                      Contains("latest_checkpointed_iteration.txt must hold exactly an iteration "
                               "number"));
  }
  overwrite(latest, "3abc\n");
  CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("holds '3abc\\n'"));
  overwrite(latest, "3");
  CHECK(CheckpointReader::open(dir).step() == 3);
  overwrite(latest, "4\n");
  CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("no checkpoint iteration 4 in"));
  fs::remove_all(dir);
}

TEST_CASE("truncated, corrupted, incomplete, foreign or partial checkpoints are refused by name") {
  auto const dir = scratch("broken");
  save_world(dir, 2, 3);
  auto const iter = dir / "iter_0000003";
  auto const file = iter / "rank_00001.bin";
  auto bytes = slurp(file);
  auto const whole = [](CheckpointReader const& c) {  // the weight and its moments
    std::vector<double> out(48);
    for (char const* t : {"w", "w.exp_avg", "w.exp_avg_sq"})
      c.fill(t, 6, 8, {{.row0 = 0, .rows = 6, .col0 = 0, .cols = 8}}, std::span<double>(out));
  };

  SECTION("truncated") {
    overwrite(file, bytes.substr(0, bytes.size() / 2));
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("rank_00001.bin is truncated"));
  }
  SECTION("corrupted") {
    bytes[bytes.size() / 2] ^= 0x5a;
    overwrite(file, bytes);
    auto const ckpt = CheckpointReader::open(dir);  // sizes and save ids still match
    CHECK_THROWS_WITH(whole(ckpt), Contains("rank_00001.bin is corrupted (checksum mismatch"));
    CHECK_THROWS_WITH(ckpt.verify_files(), Contains("rank_00001.bin is corrupted"));
  }
  SECTION("a file of another save under a listed name") {
    bytes[10] = bytes[10] == 'f' ? 'e' : 'f';  // the save id in the header
    overwrite(file, bytes);
    CHECK_THROWS_WITH(CheckpointReader::open(dir),
                      Contains("rank_00001.bin belongs to another save"));
  }
  SECTION("incomplete: no metadata") {
    fs::remove(iter / "metadata.txt");
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("is incomplete (no metadata.txt)"));
  }
  SECTION("format v1 (metadata.json) is refused") {
    fs::remove(iter / "metadata.txt");
    overwrite(iter / "metadata.json", "{\"iteration\": 3}\n");
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("is format v1 (metadata.json)"));
  }
  SECTION("garbage, truncated or other-format metadata") {
    auto const meta = slurp(iter / "metadata.txt");
    overwrite(iter / "metadata.txt", "garbage\n");
    CHECK_THROWS_WITH(CheckpointReader::open(dir),
                      Contains("metadata.txt is not moefold checkpoint metadata"));
    overwrite(iter / "metadata.txt", meta.substr(0, meta.size() / 2));
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("metadata.txt"));
    overwrite(iter / "metadata.txt", meta.substr(0, meta.size() - 4));  // no "end"
    CHECK_THROWS_WITH(CheckpointReader::open(dir), Contains("is truncated (no 'end' line)"));
    overwrite(iter / "metadata.txt", "moefold-checkpoint 3\n" + meta.substr(meta.find('\n') + 1));
    CHECK_THROWS_WITH(CheckpointReader::open(dir),
                      Contains("is checkpoint format v3; this moefold reads format v2 only"));
  }
  SECTION("a listed file missing") {
    fs::remove(file);
    CHECK_THROWS_WITH(CheckpointReader::open(dir),
                      Contains("rank_00001.bin (listed in metadata.txt) is missing"));
  }
  SECTION("a tensor of another shape or name") {
    auto const ckpt = CheckpointReader::open(dir);
    std::vector<double> out(8);
    CHECK_THROWS_WITH(ckpt.fill("w", 1, 8, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 8}},
                                std::span<double>(out)),
                      Contains("'w' is 6×8 in the checkpoint but 1×8 here"));
    CHECK_THROWS_WITH(ckpt.fill("missing", 1, 8, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 8}},
                                std::span<double>(out)),
                      Contains("has no tensor 'missing'"));
  }
  SECTION("no checkpoint at all") {
    CHECK_THROWS_WITH(CheckpointReader::open(dir / "nowhere"), Contains("no checkpoint in"));
  }
  fs::remove_all(dir);
}

TEST_CASE("elements no rank saved are refused by position") {
  auto const dir = scratch("uncovered");
  save_world(dir, 2, 3, 0.5, {}, /*skip_rank1_weight=*/true);
  std::vector<double> out(48);
  CHECK_THROWS_WITH(
      CheckpointReader::open(dir).fill("w", 6, 8, {{.row0 = 0, .rows = 6, .col0 = 0, .cols = 8}},
                                       std::span<double>(out)),
      Contains("does not cover element (0, 4) of 'w'"));
  fs::remove_all(dir);
}

TEST_CASE("a large tensor is cut into row segments and a reader reads only those it needs") {
  auto const dir = scratch("segments");
  std::int64_t const rows = 1000, cols = 600;  // 2.4 MB of floats: three segments of ≤ 1 MiB
  inproc::run(1, [&](inproc::Communicator& world) {
    std::vector<float> v(static_cast<std::size_t>(rows * cols));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
    save_checkpoint(
        world, dir, 1,
        {ShardEntry::view("big", rows, cols, {{.row0 = 0, .rows = rows, .col0 = 0, .cols = cols}},
                          std::span<float const>(v))},
        {});
  });
  auto const reader = CheckpointReader::open(dir);
  auto const& segments = reader.metadata().tensors.at("big").segments;
  REQUIRE(segments.size() == 3);
  std::int64_t next = 0;
  for (auto const& s : segments) {
    CHECK(s.block.row0 == next);
    CHECK(s.block.rows * cols * 4 <= (1 << 20));
    next += s.block.rows;
  }
  CHECK(next == rows);
  // Corrupt the last segment: rows of the first still load, exactly; the last are refused.
  auto const file = dir / "iter_0000001" / "rank_00000.bin";
  auto bytes = slurp(file);
  bytes[bytes.size() - 1] ^= 0x5a;
  overwrite(file, bytes);
  auto const ckpt = CheckpointReader::open(dir);
  std::vector<float> part(2 * 3);
  ckpt.fill("big", rows, cols, {{.row0 = 10, .rows = 2, .col0 = 7, .cols = 3}},
            std::span<float>(part));
  CHECK(part == std::vector<float>{6007, 6008, 6009, 6607, 6608, 6609});
  std::vector<float> last(1);
  CHECK_THROWS_WITH(
      ckpt.fill("big", rows, cols, {{.row0 = rows - 1, .rows = 1, .col0 = 0, .cols = 1}},
                std::span<float>(last)),
      Contains("is corrupted (checksum mismatch in 'big'"));
  fs::remove_all(dir);
}
