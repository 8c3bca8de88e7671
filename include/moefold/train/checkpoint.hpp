#pragma once
/// \file
/// Sharded checkpoints that survive a change of folding.
///
/// Layout of a checkpoint directory (Megatron's names where they exist):
///
///   <dir>/latest_checkpointed_iteration.txt      the last complete iteration
///   <dir>/iter_0000010/rank_00003.bin            one file per writing rank: its shards
///   <dir>/iter_0000010/metadata.json             written last: the checkpoint is complete
///
/// A shard names its global tensor (name, global shape) and the blocks of it that it holds
/// (`ParamBlock`s, as the parameters describe themselves), so a rank of *another* folding can
/// assemble its own blocks from whichever files cover them. Every file is written to a temporary
/// name, flushed and renamed (atomic), and ends with an FNV-1a-64 checksum; a truncated or
/// corrupted file, a missing tensor or an uncovered element is refused with an error naming it.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/error.hpp"
#include "moefold/nn/parameter.hpp"

namespace moefold {
inline namespace v0 {

/// One rank's shard of a global tensor: its blocks, concatenated row-major, as doubles.
struct ShardEntry {
  std::string name;
  std::int64_t global_rows = 0;
  std::int64_t global_cols = 0;
  std::vector<ParamBlock> blocks;
  std::vector<double> data;
};

namespace detail {

inline constexpr char kCkptMagic[8] = {'M', 'O', 'E', 'F', 'O', 'L', 'D', 'C'};
inline constexpr char kCkptEnd[8] = {'M', 'O', 'E', 'F', 'E', 'N', 'D', '!'};
inline constexpr std::uint32_t kCkptVersion = 1;

inline std::uint64_t fnv1a(std::span<char const> bytes, std::uint64_t h = 0xcbf29ce484222325ull) {
  for (char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

class ByteWriter {
 public:
  template <class V>
  void put(V const& v) {
    char const* p = reinterpret_cast<char const*>(&v);
    buf_.insert(buf_.end(), p, p + sizeof(V));
  }
  void put_bytes(void const* p, std::size_t n) {
    buf_.insert(buf_.end(), static_cast<char const*>(p), static_cast<char const*>(p) + n);
  }
  std::vector<char>& bytes() { return buf_; }

 private:
  std::vector<char> buf_;
};

class ByteReader {
 public:
  ByteReader(std::span<char const> b, std::string what) : b_(b), what_(std::move(what)) {}
  template <class V>
  V get() {
    V v;
    need(sizeof(V));
    std::memcpy(&v, b_.data() + pos_, sizeof(V));
    pos_ += sizeof(V);
    return v;
  }
  void get_bytes(void* out, std::size_t n) {
    need(n);
    std::memcpy(out, b_.data() + pos_, n);
    pos_ += n;
  }

 private:
  void need(std::size_t n) const {
    if (pos_ + n > b_.size())
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint file {} is truncated (needs {} more bytes at offset {})",
                              what_, n, pos_));
  }
  std::span<char const> b_;
  std::string what_;
  std::size_t pos_ = 0;
};

/// Writes `bytes` to `path` atomically: a temporary file, flushed to disk, then renamed.
inline void write_atomically(std::filesystem::path const& path, std::span<char const> bytes) {
  auto const tmp = path.string() + ".tmp." + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr)
    throw error(errc::invalid_argument, fmt::format("cannot write {}: {}", tmp, std::strerror(errno)));
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(::fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw error(errc::invalid_argument, fmt::format("writing {} failed: {}", tmp, std::strerror(errno)));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw error(errc::invalid_argument, fmt::format("renaming {} failed: {}", tmp, ec.message()));
}

inline std::vector<char> read_file(std::filesystem::path const& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error(errc::invalid_argument, fmt::format("cannot read checkpoint file {}", path.string()));
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

inline std::string iter_name(std::int64_t step) { return fmt::format("iter_{:07d}", step); }

}  // namespace detail

/// Serializes `entries` of `rank` at `step` (with checksum and end marker).
inline std::vector<char> encode_shards(std::int64_t step, int rank, std::vector<ShardEntry> const& entries) {
  detail::ByteWriter w;
  w.put_bytes(detail::kCkptMagic, 8);
  w.put(detail::kCkptVersion);
  w.put(static_cast<std::int64_t>(step));
  w.put(static_cast<std::int32_t>(rank));
  w.put(static_cast<std::uint32_t>(entries.size()));
  for (auto const& e : entries) {
    w.put(static_cast<std::uint32_t>(e.name.size()));
    w.put_bytes(e.name.data(), e.name.size());
    w.put(e.global_rows);
    w.put(e.global_cols);
    w.put(static_cast<std::uint32_t>(e.blocks.size()));
    std::int64_t total = 0;
    for (auto const& b : e.blocks) {
      w.put(b.row0), w.put(b.rows), w.put(b.col0), w.put(b.cols);
      total += b.size();
    }
    MOEFOLD_EXPECTS(total == static_cast<std::int64_t>(e.data.size()),
                    "checkpoint entry '{}': blocks hold {} elements but data has {}", e.name, total,
                    e.data.size());
    w.put(static_cast<std::uint64_t>(e.data.size()));
    w.put_bytes(e.data.data(), e.data.size() * sizeof(double));
  }
  std::uint64_t const sum = detail::fnv1a(w.bytes());
  w.put(sum);
  w.put_bytes(detail::kCkptEnd, 8);
  return std::move(w.bytes());
}

/// Parses and verifies one rank file; throws naming the file when it is truncated or corrupted.
inline std::vector<ShardEntry> decode_shards(std::span<char const> bytes, std::string const& what,
                                             std::int64_t* step = nullptr) {
  std::size_t const trailer = sizeof(std::uint64_t) + 8;
  if (bytes.size() < 8 + trailer || std::memcmp(bytes.data(), detail::kCkptMagic, 8) != 0)
    throw error(errc::invalid_argument, fmt::format("checkpoint file {} is not a moefold checkpoint "
                                                    "or is truncated ({} bytes)", what, bytes.size()));
  if (std::memcmp(bytes.data() + bytes.size() - 8, detail::kCkptEnd, 8) != 0)
    throw error(errc::invalid_argument, fmt::format("checkpoint file {} is truncated (no end marker)", what));
  std::uint64_t stored = 0;
  std::memcpy(&stored, bytes.data() + bytes.size() - trailer, sizeof stored);
  if (detail::fnv1a(bytes.first(bytes.size() - trailer)) != stored)
    throw error(errc::invalid_argument, fmt::format("checkpoint file {} is corrupted (checksum mismatch)", what));
  detail::ByteReader r(bytes.first(bytes.size() - trailer), what);
  char magic[8];
  r.get_bytes(magic, 8);
  if (auto v = r.get<std::uint32_t>(); v != detail::kCkptVersion)
    throw error(errc::invalid_argument, fmt::format("checkpoint file {} has version {}, expected {}", what, v, detail::kCkptVersion));
  auto const s = r.get<std::int64_t>();
  if (step) *step = s;
  (void)r.get<std::int32_t>();
  auto const n = r.get<std::uint32_t>();
  std::vector<ShardEntry> out(n);
  for (auto& e : out) {
    e.name.resize(r.get<std::uint32_t>());
    r.get_bytes(e.name.data(), e.name.size());
    e.global_rows = r.get<std::int64_t>();
    e.global_cols = r.get<std::int64_t>();
    e.blocks.resize(r.get<std::uint32_t>());
    for (auto& b : e.blocks) {
      b.row0 = r.get<std::int64_t>(), b.rows = r.get<std::int64_t>();
      b.col0 = r.get<std::int64_t>(), b.cols = r.get<std::int64_t>();
    }
    e.data.resize(r.get<std::uint64_t>());
    r.get_bytes(e.data.data(), e.data.size() * sizeof(double));
  }
  return out;
}

/// Writes this rank's shards of iteration `step` under `dir`; rank 0 then writes
/// `metadata_json` and marks the iteration as the latest. Collective over `world`: every rank
/// must call it (ranks with no entries write nothing).
template <Communicator C>
void save_checkpoint(C& world, std::filesystem::path const& dir, std::int64_t step,
                     std::vector<ShardEntry> const& entries, std::string const& metadata_json) {
  auto const iter_dir = dir / detail::iter_name(step);
  std::vector<std::int32_t> failed{0};
  std::string reason;
  try {
    std::filesystem::create_directories(iter_dir);
    if (!entries.empty())
      detail::write_atomically(iter_dir / fmt::format("rank_{:05d}.bin", world.rank()),
                               encode_shards(step, world.rank(), entries));
  } catch (std::exception const& e) {
    failed[0] = 1;
    reason = e.what();
  }
  world.all_reduce(std::span<std::int32_t>(failed), ReduceOp::max);
  if (failed[0])
    throw error(errc::invalid_argument,
                reason.empty() ? fmt::format("saving checkpoint {} failed on another rank", iter_dir.string())
                               : reason);
  if (world.rank() == 0) {
    detail::write_atomically(iter_dir / "metadata.json",
                             std::span<char const>(metadata_json.data(), metadata_json.size()));
    std::string const latest = std::to_string(step) + "\n";
    detail::write_atomically(dir / "latest_checkpointed_iteration.txt",
                             std::span<char const>(latest.data(), latest.size()));
  }
  world.barrier();
}

/// A complete checkpoint iteration, read and verified: assembles any block of any saved tensor.
class CheckpointReader {
 public:
  /// Opens iteration `step` of `dir`, or the latest when `step` is empty.
  static CheckpointReader open(std::filesystem::path const& dir, std::optional<std::int64_t> step = {}) {
    namespace fs = std::filesystem;
    if (!step) {
      std::ifstream in(dir / "latest_checkpointed_iteration.txt");
      std::int64_t s = -1;
      if (!(in >> s) || s < 0)
        throw error(errc::invalid_argument,
                    fmt::format("no checkpoint in {} (latest_checkpointed_iteration.txt missing or "
                                "unreadable)", dir.string()));
      step = s;
    }
    CheckpointReader c;
    c.step_ = *step;
    auto const iter_dir = dir / detail::iter_name(*step);
    std::error_code ec;
    if (!fs::exists(iter_dir / "metadata.json", ec))
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint {} is incomplete (no metadata.json)", iter_dir.string()));
    auto const meta = detail::read_file(iter_dir / "metadata.json");
    c.metadata_.assign(meta.begin(), meta.end());
    std::vector<fs::path> files;
    for (auto const& e : fs::directory_iterator(iter_dir, ec))
      if (e.path().extension() == ".bin") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (auto const& f : files) {
      auto const bytes = detail::read_file(f);
      std::int64_t file_step = -1;
      for (auto& e : decode_shards(bytes, f.string(), &file_step)) {
        std::string const name = e.name;
        c.shards_[name].push_back(std::move(e));
      }
      if (file_step != *step)
        throw error(errc::invalid_argument, fmt::format("checkpoint file {} holds iteration {}, not {}",
                                                        f.string(), file_step, *step));
    }
    return c;
  }

  std::int64_t step() const noexcept { return step_; }
  std::string const& metadata() const noexcept { return metadata_; }
  bool contains(std::string const& name) const { return shards_.count(name) != 0; }

  /// Fills `out` with the blocks `want` of global tensor `name` (shape rows × cols),
  /// concatenated row-major. Throws when the tensor is missing, its shape differs, or an element
  /// is not covered by any saved shard.
  void fill(std::string const& name, std::int64_t rows, std::int64_t cols,
            std::vector<ParamBlock> const& want, std::span<double> out) const {
    auto it = shards_.find(name);
    if (it == shards_.end())
      throw error(errc::invalid_argument, fmt::format("checkpoint iteration {} has no tensor '{}'", step_, name));
    std::size_t off = 0;
    for (auto const& w : want) {
      std::vector<char> covered(static_cast<std::size_t>(w.size()), 0);
      for (auto const& s : it->second) {
        if (s.global_rows != rows || s.global_cols != cols)
          throw error(errc::invalid_argument,
                      fmt::format("tensor '{}' is {}×{} in the checkpoint but {}×{} here", name,
                                  s.global_rows, s.global_cols, rows, cols));
        std::size_t soff = 0;
        for (auto const& b : s.blocks) {
          std::int64_t const r0 = std::max(b.row0, w.row0), r1 = std::min(b.row0 + b.rows, w.row0 + w.rows);
          std::int64_t const c0 = std::max(b.col0, w.col0), c1 = std::min(b.col0 + b.cols, w.col0 + w.cols);
          for (std::int64_t r = r0; r < r1; ++r)
            for (std::int64_t c = c0; c < c1; ++c) {
              auto const dst = static_cast<std::size_t>((r - w.row0) * w.cols + (c - w.col0));
              out[off + dst] = s.data[soff + static_cast<std::size_t>((r - b.row0) * b.cols + (c - b.col0))];
              covered[dst] = 1;
            }
          soff += static_cast<std::size_t>(b.size());
        }
      }
      for (std::size_t i = 0; i < covered.size(); ++i)
        if (!covered[i])
          throw error(errc::invalid_argument,
                      fmt::format("checkpoint iteration {} does not cover element ({}, {}) of '{}'",
                                  step_, w.row0 + static_cast<std::int64_t>(i) / w.cols,
                                  w.col0 + static_cast<std::int64_t>(i) % w.cols, name));
      off += static_cast<std::size_t>(w.size());
    }
  }

 private:
  std::int64_t step_ = 0;
  std::string metadata_;
  std::map<std::string, std::vector<ShardEntry>> shards_;
};

}  // namespace v0
}  // namespace moefold
