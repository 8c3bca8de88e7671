#pragma once
/// \file
/// Sharded checkpoints (format v2) that survive a change of folding and can never mix saves.
///
/// Layout of a checkpoint directory (Megatron's names where they exist):
///
///   <dir>/latest_checkpointed_iteration.txt   exactly the last complete iteration, e.g. "10\n"
///   <dir>/iter_0000010/metadata.txt           settings, files, tensor index
///   (checkpoint_metadata.hpp) <dir>/iter_0000010/rank_00003.bin         one file per writing rank:
///   its segments, raw
///
/// An iteration is written into a fresh directory `iter_0000010.tmp.<save id>`, every file
/// flushed to disk, and renamed into place whole (the directory flushed too), so a directory
/// `iter_*` only ever holds the files of one save; `metadata.txt` lists each of them with its
/// size and checksum, and a reader opens only those. Each tensor is stored in its own dtype and
/// cut into segments of whole rows (at most about 1 MiB each), each with its own checksum: a
/// rank of *another* folding reads exactly the segments that overlap its blocks, so its memory
/// is its own shard plus one segment. docs/checkpoints.md states the guarantees.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/bf16.hpp"
#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/train/checkpoint_metadata.hpp"
#include "moefold/train/detail/checkpoint_io.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// `src` of `exec`'s memory copied into host memory (the device → host step of a save).
template <class Exec, class T>
Buffer<T> copy_to_host(Exec const& exec, View<T const, typename Exec::memory_space> src) {
  Buffer<T> host(src.size());
  copy(exec, src, host.view());
  exec.fence();
  return host;
}
}  // namespace detail

/// One rank's shard of a global tensor, to save: the blocks of the global `rows × cols` tensor
/// it holds and its local elements (the blocks concatenated, each row-major) in their own type.
struct ShardEntry {
  std::string name;
  std::int64_t global_rows = 0;
  std::int64_t global_cols = 0;
  std::vector<ParamBlock> blocks;
  DType dtype = DType::f32;
  std::span<char const> borrowed;  ///< the elements' bytes, when they live elsewhere
  std::vector<char> owned;         ///< the elements' bytes, when the entry holds them

  /// An entry that refers to `data` (which must outlive the save).
  template <CommScalar T>
  static ShardEntry view(std::string name, std::int64_t rows, std::int64_t cols,
                         std::vector<ParamBlock> blocks, std::span<T const> data) {
    ShardEntry e{std::move(name), rows, cols, std::move(blocks), dtype_of<T>(), {}, {}};
    e.borrowed =
        std::span<char const>(reinterpret_cast<char const*>(data.data()), data.size_bytes());
    return e;
  }
  /// An entry that holds a copy of `data`.
  template <CommScalar T>
  static ShardEntry copy(std::string name, std::int64_t rows, std::int64_t cols,
                         std::vector<ParamBlock> blocks, std::span<T const> data) {
    ShardEntry e{std::move(name), rows, cols, std::move(blocks), dtype_of<T>(), {}, {}};
    auto const* p = reinterpret_cast<char const*>(data.data());
    e.owned.assign(p, p + data.size_bytes());
    return e;
  }
  /// An entry of `data` in the memory of `exec`: host memory is referred to (it must outlive
  /// the save, and the instance's work on it must be done: `save_checkpoint(exec, …)` fences);
  /// memory the host cannot read is copied to the host here.
  template <ExecutionInstance Exec, CommScalar T>
  static ShardEntry of(Exec const& exec, std::string name, std::int64_t rows, std::int64_t cols,
                       std::vector<ParamBlock> blocks,
                       View<T const, typename Exec::memory_space> data) {
    if constexpr (Exec::memory_space::host_accessible) {
      return view(std::move(name), rows, cols, std::move(blocks), std::span<T const>(data));
    } else {
      auto const host = detail::copy_to_host<Exec, T>(exec, data);
      return copy(std::move(name), rows, cols, std::move(blocks), std::span<T const>(host));
    }
  }
  /// The elements' bytes.
  std::span<char const> bytes() const noexcept {
    return owned.empty() ? borrowed : std::span<char const>(owned);
  }
};

/// Choices of `save_checkpoint`.
struct CheckpointSaveOptions {
  int keep_last = 0;  ///< keep only the newest N iterations of the directory (0: keep all)
};

namespace detail {

inline constexpr std::size_t kCkptSegmentBytes = std::size_t{1} << 20;
inline constexpr char const* kCkptMetadataFile = "metadata.txt";
inline constexpr char const* kCkptLatestFile = "latest_checkpointed_iteration.txt";

/// Writes `entries` into `path` (header, then each block cut into segments of whole rows) and
/// returns the manifest: this file and its tensors' segments.
inline CheckpointMetadata write_rank_file(std::filesystem::path const& path,
                                          std::string const& save_id,
                                          std::vector<ShardEntry> const& entries) {
  CheckpointMetadata m;
  m.save_id = save_id;
  CheckpointFileWriter w(path);
  w.write(std::span<char const>(kCkptFileMagic, 8));
  w.write(std::span<char const>(save_id.data(), save_id.size()));
  std::string const file = path.filename().string();
  for (auto const& e : entries) {
    std::size_t const esize = size_of(e.dtype);
    std::int64_t total = 0;
    for (auto const& b : e.blocks) total += b.size();
    auto const bytes = e.bytes();
    MOEFOLD_EXPECTS(static_cast<std::size_t>(total) * esize == bytes.size(),
                    "checkpoint entry '{}': its blocks hold {} elements of {} but it has {} bytes",
                    e.name, total, name(e.dtype), bytes.size());
    MOEFOLD_EXPECTS(m.tensors.count(e.name) == 0, "checkpoint entry '{}' is given twice", e.name);
    CheckpointTensor& t = m.tensors[e.name] = {e.name, e.dtype, e.global_rows, e.global_cols, {}};
    std::size_t local = 0;
    for (auto const& b : e.blocks) {
      MOEFOLD_EXPECTS(b.row0 >= 0 && b.col0 >= 0 && b.row0 + b.rows <= e.global_rows &&
                          b.col0 + b.cols <= e.global_cols,
                      "checkpoint entry '{}': block rows [{}, {}) cols [{}, {}) outside {}×{}",
                      e.name, b.row0, b.row0 + b.rows, b.col0, b.col0 + b.cols, e.global_rows,
                      e.global_cols);
      if (b.size() == 0) continue;
      std::size_t const row_bytes = static_cast<std::size_t>(b.cols) * esize;
      auto const step =
          static_cast<std::int64_t>(std::max<std::size_t>(1, kCkptSegmentBytes / row_bytes));
      for (std::int64_t r = 0; r < b.rows; r += step) {
        std::int64_t const n = std::min(step, b.rows - r);
        auto const seg = bytes.subspan(local, static_cast<std::size_t>(n) * row_bytes);
        t.segments.push_back({file,
                              w.size(),
                              {.row0 = b.row0 + r, .rows = n, .col0 = b.col0, .cols = b.cols},
                              fnv1a(seg)});
        w.write(seg);
        local += seg.size();
      }
    }
  }
  w.close();
  m.files.push_back({file, w.size(), w.checksum()});
  return m;
}

/// Adds a rank's manifest to the iteration's metadata (a tensor several ranks hold must have
/// the same shape and dtype everywhere).
inline void merge_manifest(CheckpointMetadata& into, CheckpointMetadata const& part) {
  for (auto const& f : part.files) into.files.push_back(f);
  for (auto const& [name, t] : part.tensors) {
    auto [it, fresh] = into.tensors.try_emplace(name, t);
    if (fresh) continue;
    CheckpointTensor& have = it->second;
    MOEFOLD_EXPECTS(have.rows == t.rows && have.cols == t.cols && have.dtype == t.dtype,
                    "checkpoint tensor '{}' is saved as {}×{} {} by one rank and {}×{} {} by "
                    "another",
                    name, have.rows, have.cols, moefold::name(have.dtype), t.rows, t.cols,
                    moefold::name(t.dtype));
    have.segments.insert(have.segments.end(), t.segments.begin(), t.segments.end());
  }
}

/// Removes what an interrupted save left in `dir`: temporary iteration directories
/// (`iter_*.tmp.*`), set-aside old iterations (`iter_*.old.*`) and temporary latest files.
inline void remove_leftovers(std::filesystem::path const& dir) {
  std::vector<std::filesystem::path> doomed;
  for (auto const& e : std::filesystem::directory_iterator(dir)) {
    std::string const n = e.path().filename().string();
    if ((n.rfind("iter_", 0) == 0 &&
         (n.find(".tmp.") != std::string::npos || n.find(".old.") != std::string::npos)) ||
        n.rfind(std::string(kCkptLatestFile) + ".tmp.", 0) == 0)
      doomed.push_back(e.path());
  }
  for (auto const& p : doomed) std::filesystem::remove_all(p);
}

/// Removes all but the newest `keep` iteration directories of `dir`, never `current`.
inline void remove_old_iterations(std::filesystem::path const& dir, int keep,
                                  std::int64_t current) {
  std::vector<std::int64_t> its;
  for (auto const& e : std::filesystem::directory_iterator(dir))
    if (auto const i = iteration_of(e.path().filename().string()); i >= 0 && e.is_directory())
      its.push_back(i);
  std::sort(its.begin(), its.end(), std::greater<>());
  for (std::size_t k = static_cast<std::size_t>(keep); k < its.size(); ++k)
    if (its[k] != current) std::filesystem::remove_all(dir / iter_name(its[k]));
}

/// Rank 0's part of a save once every rank file is on disk: writes the metadata, renames the
/// iteration into place, points `latest` at it and applies the retention.
inline void publish_iteration(std::filesystem::path const& dir, std::filesystem::path const& tmp,
                              CheckpointMetadata const& meta, CheckpointSaveOptions const& opts) {
  namespace fs = std::filesystem;
  {
    CheckpointFileWriter w(tmp / kCkptMetadataFile);
    std::string const text = meta.to_text();
    w.write(std::span<char const>(text.data(), text.size()));
    w.close();
  }
  fsync_directory(tmp);
  auto const final_dir = dir / iter_name(meta.iteration);
  if (fs::exists(final_dir)) {  // a re-save of the iteration: set the old one aside, whole
    auto const old = dir / (iter_name(meta.iteration) + ".old." + meta.save_id);
    fs::rename(final_dir, old);
    fs::rename(tmp, final_dir);
    fsync_directory(dir);
    fs::remove_all(old);
  } else {
    fs::rename(tmp, final_dir);
  }
  fsync_directory(dir);
  write_file_atomically(dir / kCkptLatestFile, std::to_string(meta.iteration) + "\n");
  if (opts.keep_last > 0) remove_old_iterations(dir, opts.keep_last, meta.iteration);
}

inline std::string new_save_id() {
  std::random_device rd;
  std::uint64_t x = (std::uint64_t{rd()} << 32) ^ rd();
  x ^= static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  x ^= static_cast<std::uint64_t>(::getpid()) << 17;
  return fmt::format("{:016x}", x);
}

/// Every rank's text, in rank order (collective over `world`).
template <Communicator C>
std::vector<std::string> all_gather_text(C& world, std::string const& mine) {
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(world.size()));
  std::array<std::int64_t, 1> const my_size{static_cast<std::int64_t>(mine.size())};
  world.all_gather(std::span<std::int64_t const>(my_size), std::span<std::int64_t>(sizes));
  std::int64_t total = 0;
  for (auto s : sizes) total += s;
  std::vector<std::uint8_t> all(static_cast<std::size_t>(total));
  world.all_gather_v(std::span<std::uint8_t const>(
                         reinterpret_cast<std::uint8_t const*>(mine.data()), mine.size()),
                     std::span<std::uint8_t>(all), std::span<std::int64_t const>(sizes));
  std::vector<std::string> out;
  std::size_t off = 0;
  for (auto s : sizes) {
    out.emplace_back(reinterpret_cast<char const*>(all.data()) + off, static_cast<std::size_t>(s));
    off += static_cast<std::size_t>(s);
  }
  return out;
}

}  // namespace detail

/// Saves iteration `iteration` under `dir`: each rank writes its `entries` (one replica of
/// every element across the world; ranks with none write no file), rank 0 writes the metadata
/// (`info`, the files, the tensor index), renames the iteration into place whole and points
/// `latest_checkpointed_iteration.txt` at it. Leftovers of an interrupted save are removed
/// first; with `opts.keep_last = N` only the newest N iterations stay. One save per directory
/// at a time. Throws on every rank when any rank fails (nothing of that save becomes visible).
/// Collective over `world`: every rank must call it.
template <Communicator C>
void save_checkpoint(C& world, std::filesystem::path const& dir, std::int64_t iteration,
                     std::vector<ShardEntry> const& entries, CheckpointInfo const& info,
                     CheckpointSaveOptions const& opts = {}) {
  namespace fs = std::filesystem;
  MOEFOLD_EXPECTS(iteration >= 0, "checkpoint iteration {} must not be negative", iteration);
  MOEFOLD_EXPECTS(opts.keep_last >= 0, "keep_last {} must not be negative", opts.keep_last);
  // 1. Rank 0 clears leftovers and makes the temporary directory; every rank learns its name.
  std::string reason;
  std::array<std::int64_t, 2> head{0, 0};
  std::string save_id;
  if (world.rank() == 0) {
    try {
      fs::create_directories(dir);
      detail::remove_leftovers(dir);
      save_id = detail::new_save_id();
      fs::create_directory(dir / (detail::iter_name(iteration) + ".tmp." + save_id));
      head[1] = static_cast<std::int64_t>(std::stoull(save_id, nullptr, 16));
    } catch (std::exception const& e) {
      head[0] = 1;
      reason = e.what();
    }
  }
  world.broadcast(std::span<std::int64_t>(head), 0);
  if (head[0] != 0)
    throw error(errc::invalid_argument,
                world.rank() == 0
                    ? reason
                    : fmt::format("saving checkpoint {} failed on rank 0", dir.string()));
  save_id = fmt::format("{:016x}", static_cast<std::uint64_t>(head[1]));
  auto const tmp = dir / (detail::iter_name(iteration) + ".tmp." + save_id);
  // 2. Every rank writes its file; the manifests (or the errors) go to every rank.
  std::string manifest;
  if (!entries.empty()) {
    try {
      manifest = detail::write_rank_file(tmp / fmt::format("rank_{:05d}.bin", world.rank()),
                                         save_id, entries)
                     .to_text();
    } catch (std::exception const& e) {
      manifest = std::string("error ") + e.what();
    }
  }
  auto const manifests = detail::all_gather_text(world, manifest);
  for (std::size_t r = 0; r < manifests.size(); ++r)
    if (manifests[r].rfind("error ", 0) == 0) {
      std::error_code ignored;  // a leftover is removed by the next save anyway
      if (world.rank() == 0) fs::remove_all(tmp, ignored);
      throw error(errc::invalid_argument,
                  fmt::format("saving checkpoint iteration {} in {} failed on rank {}: {}",
                              iteration, dir.string(), r, manifests[r].substr(6)));
    }
  // 3. Rank 0 writes the metadata and publishes the iteration.
  std::array<std::int64_t, 1> failed{0};
  if (world.rank() == 0) {
    try {
      CheckpointMetadata meta;
      meta.iteration = iteration;
      meta.save_id = save_id;
      meta.info = info;
      for (std::size_t r = 0; r < manifests.size(); ++r)
        if (!manifests[r].empty())
          detail::merge_manifest(
              meta, CheckpointMetadata::parse(manifests[r], fmt::format("rank {}'s manifest", r)));
      detail::publish_iteration(dir, tmp, meta, opts);
    } catch (std::exception const& e) {
      failed[0] = 1;
      reason = e.what();
    }
  }
  world.broadcast(std::span<std::int64_t>(failed), 0);
  if (failed[0] != 0)
    throw error(errc::invalid_argument,
                world.rank() == 0
                    ? reason
                    : fmt::format("saving checkpoint {} failed on rank 0", dir.string()));
}

/// `save_checkpoint` of entries that refer to memory of `exec` (`ShardEntry::of`): waits for the
/// instance's work first. Collective over `world`.
template <ExecutionInstance Exec, Communicator C>
void save_checkpoint(Exec const& exec, C& world, std::filesystem::path const& dir,
                     std::int64_t iteration, std::vector<ShardEntry> const& entries,
                     CheckpointInfo const& info, CheckpointSaveOptions const& opts = {}) {
  exec.fence();
  save_checkpoint(world, dir, iteration, entries, info, opts);
}

/// A complete checkpoint iteration: its metadata, read and checked against its files; reads
/// any block of any saved tensor from exactly the segments that cover it. Open one per rank
/// (its reads are not shared between threads).
class CheckpointReader {
 public:
  /// Opens iteration `step` of `dir`, or the one `latest_checkpointed_iteration.txt` names.
  /// Throws naming the file when the latest file does not hold exactly an integer, the
  /// iteration is missing or incomplete, its metadata is not format v2, or a listed file is
  /// missing, has another size or belongs to another save.
  static CheckpointReader open(std::filesystem::path const& dir,
                               std::optional<std::int64_t> step = {}) {
    namespace fs = std::filesystem;
    if (!step) {
      auto const latest = dir / detail::kCkptLatestFile;
      if (!fs::exists(latest))
        throw error(errc::invalid_argument, fmt::format("no checkpoint in {} ({} missing)",
                                                        dir.string(), detail::kCkptLatestFile));
      step = detail::parse_latest(detail::read_text_file(latest), latest);
    }
    CheckpointReader c;
    c.dir_ = dir / detail::iter_name(*step);
    if (!fs::is_directory(c.dir_))
      throw error(errc::invalid_argument,
                  fmt::format("no checkpoint iteration {} in {} ({} missing)", *step, dir.string(),
                              c.dir_.string()));
    auto const meta_path = c.dir_ / detail::kCkptMetadataFile;
    if (!fs::exists(meta_path)) {
      if (fs::exists(c.dir_ / "metadata.json"))
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint {} is format v1 (metadata.json); this moefold reads "
                                "format v{} only (metadata.txt): resume it with the moefold that "
                                "wrote it",
                                c.dir_.string(), CheckpointMetadata::kFormat));
      throw error(errc::invalid_argument, fmt::format("checkpoint {} is incomplete (no {})",
                                                      c.dir_.string(), detail::kCkptMetadataFile));
    }
    c.meta_ = CheckpointMetadata::parse(detail::read_text_file(meta_path), meta_path.string());
    if (c.meta_.iteration != *step)
      throw error(errc::invalid_argument,
                  fmt::format("{} describes iteration {}, not {}", meta_path.string(),
                              c.meta_.iteration, *step));
    for (auto const& f : c.meta_.files) c.check_file(f);
    return c;
  }

  std::int64_t step() const noexcept { return meta_.iteration; }
  /// The iteration's metadata (settings, files, tensor index).
  CheckpointMetadata const& metadata() const noexcept { return meta_; }
  /// Throws naming the first model setting that differs from the checkpoint's.
  void check_model(ConfigEntries const& model) const { meta_.check_model(model); }
  bool contains(std::string const& name) const { return meta_.tensors.count(name) != 0; }

  /// Fills `out` with the blocks `want` of global tensor `name` (shape rows × cols),
  /// concatenated row-major, converted from the stored dtype to `T`. Reads only the segments
  /// that overlap `want`, each verified by its checksum. Throws when the tensor is missing, its
  /// shape differs, a segment is corrupted, or an element is not covered.
  template <class T>
  void fill(std::string const& name, std::int64_t rows, std::int64_t cols,
            std::vector<ParamBlock> const& want, std::span<T> out) const {
    auto it = meta_.tensors.find(name);
    if (it == meta_.tensors.end())
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint iteration {} has no tensor '{}'", step(), name));
    CheckpointTensor const& t = it->second;
    if (t.rows != rows || t.cols != cols)
      throw error(errc::invalid_argument,
                  fmt::format("tensor '{}' is {}×{} in the checkpoint but {}×{} here", name, t.rows,
                              t.cols, rows, cols));
    std::int64_t total = 0;
    for (auto const& w : want) total += w.size();
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(out.size()) == total,
                    "fill '{}': the blocks hold {} elements but out has {}", name, total,
                    out.size());
    std::size_t const esize = size_of(t.dtype);
    std::map<std::string, std::ifstream> files;
    std::vector<char> buf;
    std::size_t off = 0;
    for (auto const& w : want) {
      std::vector<char> covered(static_cast<std::size_t>(w.size()), 0);
      for (auto const& s : t.segments) {
        auto const& b = s.block;
        std::int64_t const r0 = std::max(b.row0, w.row0),
                           r1 = std::min(b.row0 + b.rows, w.row0 + w.rows);
        std::int64_t const c0 = std::max(b.col0, w.col0),
                           c1 = std::min(b.col0 + b.cols, w.col0 + w.cols);
        if (r0 >= r1 || c0 >= c1) continue;
        auto const path = dir_ / s.file;
        auto& in = files[s.file];
        if (!in.is_open()) {
          in.open(path, std::ios::binary);
          if (!in)
            throw error(errc::invalid_argument,
                        fmt::format("cannot read checkpoint file {}", path.string()));
        }
        buf.resize(static_cast<std::size_t>(b.size()) * esize);
        detail::read_range(in, path, s.offset, buf);
        if (detail::fnv1a(buf) != s.checksum)
          throw error(errc::invalid_argument,
                      fmt::format("checkpoint file {} is corrupted (checksum mismatch in '{}' "
                                  "rows [{}, {}) at offset {})",
                                  path.string(), name, b.row0, b.row0 + b.rows, s.offset));
        for (std::int64_t r = r0; r < r1; ++r)
          for (std::int64_t c = c0; c < c1; ++c) {
            auto const dst = static_cast<std::size_t>((r - w.row0) * w.cols + (c - w.col0));
            auto const src = static_cast<std::size_t>((r - b.row0) * b.cols + (c - b.col0));
            out[off + dst] = detail::element_as<T>(t.dtype, buf.data() + src * esize);
            covered[dst] = 1;
          }
      }
      for (std::size_t i = 0; i < covered.size(); ++i)
        if (!covered[i])
          throw error(errc::invalid_argument,
                      fmt::format("checkpoint iteration {} does not cover element ({}, {}) of '{}'",
                                  step(), w.row0 + static_cast<std::int64_t>(i) / w.cols,
                                  w.col0 + static_cast<std::int64_t>(i) % w.cols, name));
      off += static_cast<std::size_t>(w.size());
    }
  }

  /// `fill` into memory of `exec`: host memory directly, other memory through a host copy.
  template <ExecutionInstance Exec, class T>
  void fill(Exec const& exec, std::string const& name, std::int64_t rows, std::int64_t cols,
            std::vector<ParamBlock> const& want, View<T, typename Exec::memory_space> out) const {
    if constexpr (Exec::memory_space::host_accessible) {
      fill(name, rows, cols, want, std::span<T>(out));
    } else {
      Buffer<T> host(out.size());
      fill(name, rows, cols, want, std::span<T>(host));
      copy(exec, View<T const>(host.view()), out);
      exec.fence();
    }
  }

  /// Reads every listed file whole (in bounded pieces) and checks its checksum; throws naming
  /// the first corrupted file. A full scrub: loading checks only the segments it reads.
  void verify_files() const {
    std::vector<char> buf(detail::kCkptSegmentBytes);
    for (auto const& f : meta_.files) {
      auto const path = dir_ / f.name;
      std::ifstream in(path, std::ios::binary);
      std::uint64_t h = 0xcbf29ce484222325ull, n = 0;
      while (in) {
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        auto const got = static_cast<std::size_t>(in.gcount());
        h = detail::fnv1a(std::span<char const>(buf.data(), got), h);
        n += got;
      }
      if (n != f.size || h != f.checksum)
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint file {} is corrupted (checksum mismatch: {} bytes "
                                "read, {} listed)",
                                path.string(), n, f.size));
    }
  }

 private:
  /// The listed file exists, has the listed size and carries this save's id.
  void check_file(CheckpointFile const& f) const {
    auto const path = dir_ / f.name;
    std::error_code ec;
    auto const size = std::filesystem::file_size(path, ec);
    if (ec)
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint file {} (listed in {}) is missing", path.string(),
                              detail::kCkptMetadataFile));
    if (size < f.size)
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint file {} is truncated ({} bytes, {} lists {})",
                              path.string(), size, detail::kCkptMetadataFile, f.size));
    if (size > f.size)
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint file {} has {} bytes but {} lists {}: not the file this "
                              "save wrote",
                              path.string(), size, detail::kCkptMetadataFile, f.size));
    std::ifstream in(path, std::ios::binary);
    std::array<char, detail::kCkptHeaderBytes> head{};
    detail::read_range(in, path, 0, head);
    if (std::memcmp(head.data(), detail::kCkptFileMagic, 8) != 0 ||
        std::string(head.data() + 8, 16) != meta_.save_id) {
      std::string shown(head.data(), head.size());
      for (char& ch : shown)
        if (ch < 0x20 || ch > 0x7e) ch = '?';
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint file {} belongs to another save (header '{}', the "
                              "metadata's save id {})",
                              path.string(), shown, meta_.save_id));
    }
  }

  std::filesystem::path dir_;
  CheckpointMetadata meta_;
};

}  // namespace v0
}  // namespace moefold
