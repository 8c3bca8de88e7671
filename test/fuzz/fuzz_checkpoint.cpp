// Fuzz target: the checkpoint reader (format v2, include/moefold/train/checkpoint.hpp) through
// its public API. A real one-rank checkpoint is saved once; the first input byte picks what the
// rest of the input replaces:
//   0: nothing: CheckpointMetadata::parse on the text, and a parsed text must print back to a
//      text that parses to the same text;
//   1: `latest_checkpointed_iteration.txt`, then CheckpointReader::open;
//   2: `metadata.txt` (with @SAVE_ID@ standing for the save's id), then CheckpointReader::open
//      and fill() of every (small) listed tensor.
// Corrupted metadata or files must be refused with moefold::error.

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/checkpoint.hpp"

namespace {

namespace fs = std::filesystem;

void write(fs::path const& p, std::string const& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
}

// A checkpoint of iteration 0 with two tensors (an f32 one in two blocks, an f64 one), in a
// temporary directory removed at exit.
fs::path const& checkpoint_dir() {
  static fs::path const dir = [] {
    auto d = fs::temp_directory_path() / ("moefold-fuzz-ckpt-" + std::to_string(::getpid()));
    fs::remove_all(d);
    std::atexit([] { std::error_code ec; fs::remove_all(checkpoint_dir(), ec); });
    std::vector<float> const w{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    std::vector<double> const b{0.5, -0.5, 1.5};
    moefold::inproc::run(1, [&](moefold::inproc::Communicator& world) {
      std::vector<moefold::ShardEntry> entries;
      entries.push_back(moefold::ShardEntry::view<float>(
          "w", 4, 3, {{0, 2, 0, 3}, {2, 2, 0, 3}}, std::span<float const>(w)));
      entries.push_back(moefold::ShardEntry::view<double>("b", 1, 3, {{0, 1, 0, 3}},
                                                          std::span<double const>(b)));
      moefold::CheckpointInfo info;
      info.model.set("num_layers", "2");
      moefold::save_checkpoint(world, d, 0, entries, info);
    });
    return d;
  }();
  return dir;
}

void require(bool ok) {
  if (!ok) std::abort();
}

void read_all(moefold::CheckpointReader const& reader) {
  for (auto const& [name, t] : reader.metadata().tensors) {
    if (t.rows < 0 || t.cols < 0 || t.rows > 64 || t.cols > 64) continue;
    std::vector<double> out(static_cast<std::size_t>(t.rows * t.cols));
    reader.fill<double>(name, t.rows, t.cols, {moefold::ParamBlock{0, t.rows, 0, t.cols}}, out);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  if (size == 0) return 0;
  std::string const text(reinterpret_cast<char const*>(data) + 1, size - 1);
  auto const& dir = checkpoint_dir();
  auto const iter = dir / "iter_0000000";
  try {
    switch (data[0] % 3) {
      case 0: {
        auto const printed = moefold::CheckpointMetadata::parse(text, "fuzz").to_text();
        require(moefold::CheckpointMetadata::parse(printed, "printed").to_text() == printed);
        break;
      }
      case 1:
        write(dir / "latest_checkpointed_iteration.txt", text);
        read_all(moefold::CheckpointReader::open(dir));
        break;
      default: {
        static std::string const original = [&] {
          std::ifstream in(iter / "metadata.txt", std::ios::binary);
          return std::string(std::istreambuf_iterator<char>(in), {});
        }();
        // Seeds name the save as @SAVE_ID@ (each run's save has a new random id).
        static std::string const save_id =
            moefold::CheckpointMetadata::parse(original, "original").save_id;
        std::string meta = text;
        for (auto at = meta.find("@SAVE_ID@"); at != std::string::npos; at = meta.find("@SAVE_ID@"))
          meta.replace(at, 9, save_id);
        write(dir / "latest_checkpointed_iteration.txt", "0\n");
        write(iter / "metadata.txt", meta);
        try {
          read_all(moefold::CheckpointReader::open(dir));
        } catch (...) {
          write(iter / "metadata.txt", original);
          throw;
        }
        write(iter / "metadata.txt", original);
      }
    }
  } catch (moefold::error const&) {
  }
  return 0;
}
