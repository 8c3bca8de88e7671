#pragma once
/// \file
/// The metadata of a checkpoint iteration (format v2, `metadata.txt`): what was trained (named
/// settings), under which folding, every file written with its size and checksum, and an index
/// of every tensor: its dtype, global shape and the segments (file, byte offset, rows, cols,
/// checksum) that hold it. A loader reads exactly the segments it needs from exactly the files
/// listed here. docs/checkpoints.md describes the format line by line.
///
/// The format is line-oriented text of space-separated tokens (no JSON: `moefold::core` does not
/// depend on a JSON library, and a reader needs no parser beyond `>>`):
///
///   moefold-checkpoint 2
///   iteration 3
///   save_id 5f0c2a9e81d4b3c7
///   folding world_size 8                      (one line per setting; also `model`, `run`)
///   file rank_00000.bin 11078514 0123456789abcdef
///   tensor layers.0.mlp.router.weight float 8 128
///   segment rank_00000.bin 24 0 8 0 128 89abcdef01234567
///   end

#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/param.hpp"

namespace moefold {
inline namespace v0 {

/// Named settings as text, in insertion order (Megatron's names, e.g. `num_layers = 4`). Keys
/// and values are single tokens: no whitespace.
class ConfigEntries {
 public:
  /// Sets `key` to `value` formatted with fmt (bool as true/false, an empty optional as none).
  /// Throws when the key or value holds whitespace or the key is set already to another value.
  template <class V>
  ConfigEntries& set(std::string const& key, V const& value) {
    return set_text(key, format(value));
  }

  /// Adds every entry of `other` (a key both hold must have the same value in both).
  ConfigEntries& merge(ConfigEntries const& other) {
    for (auto const& [k, v] : other.entries_) set_text(k, v);
    return *this;
  }

  /// The value of `key`, if set.
  std::optional<std::string> get(std::string_view key) const {
    for (auto const& [k, v] : entries_)
      if (k == key) return v;
    return std::nullopt;
  }

  auto begin() const noexcept { return entries_.begin(); }
  auto end() const noexcept { return entries_.end(); }
  std::size_t size() const noexcept { return entries_.size(); }
  bool operator==(ConfigEntries const&) const = default;

 private:
  template <class V>
  static std::string format(V const& v) {
    if constexpr (std::is_same_v<V, bool>) {
      return v ? "true" : "false";
    } else if constexpr (requires {
                           v.has_value();
                           *v;
                         }) {
      return v ? format(*v) : std::string("none");
    } else {
      return fmt::format("{}", v);
    }
  }

  ConfigEntries& set_text(std::string const& key, std::string const& value) {
    auto const bad = [](std::string const& s) {
      return s.empty() || s.find_first_of(" \t\r\n") != std::string::npos;
    };
    MOEFOLD_EXPECTS(!bad(key) && !bad(value),
                    "checkpoint setting '{}' = '{}': keys and values must be non-empty and hold "
                    "no whitespace",
                    key, value);
    if (auto const old = get(key)) {
      MOEFOLD_EXPECTS(*old == value, "checkpoint setting '{}' is set twice, to {} and to {}", key,
                      *old, value);
      return *this;
    }
    entries_.emplace_back(key, value);
    return *this;
  }

  std::vector<std::pair<std::string, std::string>> entries_;
};

/// What a trainer records about its run: the folding, the model (checked on load: a checkpoint
/// loads only into a model whose settings are all equal) and the run (recorded, not checked:
/// seed, batch sizes, loss coefficients may change on resume).
struct CheckpointInfo {
  ConfigEntries folding;
  ConfigEntries model;
  ConfigEntries run;
};

/// A byte range of a checkpoint file holding one row range of one saved block of a tensor,
/// row-major in the tensor's dtype.
struct CheckpointSegment {
  std::string file;            ///< file name inside the iteration directory
  std::uint64_t offset = 0;    ///< byte offset in the file
  ParamBlock block;            ///< the rectangle of the global tensor it holds
  std::uint64_t checksum = 0;  ///< FNV-1a-64 of its bytes
};

/// A global tensor of a checkpoint and the segments that hold it (one replica of each element).
struct CheckpointTensor {
  std::string name;
  DType dtype = DType::f32;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::vector<CheckpointSegment> segments;
};

/// A file of a checkpoint iteration.
struct CheckpointFile {
  std::string name;
  std::uint64_t size = 0;
  std::uint64_t checksum = 0;  ///< FNV-1a-64 of the whole file
};

/// The content of `metadata.txt`.
struct CheckpointMetadata {
  static constexpr int kFormat = 2;  ///< the format this version writes and reads

  std::int64_t iteration = 0;
  std::string save_id;  ///< 16 hex digits; also in every file's header
  CheckpointInfo info;
  std::vector<CheckpointFile> files;
  std::map<std::string, CheckpointTensor> tensors;

  /// The text of `metadata.txt`.
  std::string to_text() const {
    std::string out = fmt::format("moefold-checkpoint {}\niteration {}\nsave_id {}\n", kFormat,
                                  iteration, save_id);
    auto const section = [&out](char const* what, ConfigEntries const& e) {
      for (auto const& [k, v] : e) out += fmt::format("{} {} {}\n", what, k, v);
    };
    section("folding", info.folding);
    section("model", info.model);
    section("run", info.run);
    for (auto const& f : files)
      out += fmt::format("file {} {} {:016x}\n", f.name, f.size, f.checksum);
    for (auto const& [name, t] : tensors) {
      out += fmt::format("tensor {} {} {} {}\n", name, moefold::name(t.dtype), t.rows, t.cols);
      for (auto const& s : t.segments)
        out += fmt::format("segment {} {} {} {} {} {} {:016x}\n", s.file, s.offset, s.block.row0,
                           s.block.rows, s.block.col0, s.block.cols, s.checksum);
    }
    return out + "end\n";
  }

  /// Parses `text` (the content of file `what`); throws naming the file and the line when it is
  /// not format-v2 metadata, is truncated, or a record is malformed.
  static CheckpointMetadata parse(std::string const& text, std::string const& what) {
    std::istringstream in(text);
    std::string line;
    int number = 0;
    auto const fail = [&](std::string const& why) -> error {
      return error(errc::invalid_argument, fmt::format("checkpoint metadata {} line {}: {} ('{}')",
                                                       what, number, why, line));
    };
    CheckpointMetadata m;
    std::getline(in, line), ++number;
    {
      std::istringstream ls(line);
      std::string magic;
      int format = 0;
      if (!(ls >> magic >> format) || magic != "moefold-checkpoint")
        throw error(errc::invalid_argument,
                    fmt::format("{} is not moefold checkpoint metadata (first line '{}')", what,
                                line.substr(0, 60)));
      if (format != kFormat)
        throw error(errc::invalid_argument,
                    fmt::format("{} is checkpoint format v{}; this moefold reads format v{} only",
                                what, format, kFormat));
    }
    CheckpointTensor* tensor = nullptr;
    bool ended = false;
    while (std::getline(in, line)) {
      ++number;
      if (ended) throw fail("text after 'end'");
      std::istringstream ls(line);
      std::string kind;
      ls >> kind;
      bool ok = true;
      if (kind == "iteration") {
        ok = static_cast<bool>(ls >> m.iteration);
      } else if (kind == "save_id") {
        ok = static_cast<bool>(ls >> m.save_id);
      } else if (kind == "folding" || kind == "model" || kind == "run") {
        std::string k, v;
        ok = static_cast<bool>(ls >> k >> v);
        auto& e = kind == "folding" ? m.info.folding : kind == "model" ? m.info.model : m.info.run;
        if (ok) e.set(k, v);
      } else if (kind == "file") {
        CheckpointFile f;
        ok = static_cast<bool>(ls >> f.name >> f.size >> std::hex >> f.checksum);
        m.files.push_back(f);
      } else if (kind == "tensor") {
        CheckpointTensor t;
        std::string dtype;
        ok = static_cast<bool>(ls >> t.name >> dtype >> t.rows >> t.cols);
        auto const d = parse_dtype(dtype);
        if (ok && !d) throw fail(fmt::format("unknown dtype '{}'", dtype));
        if (ok) {
          t.dtype = *d;
          if (m.tensors.count(t.name)) throw fail(fmt::format("tensor '{}' listed twice", t.name));
          tensor = &(m.tensors[t.name] = t);
        }
      } else if (kind == "segment") {
        if (tensor == nullptr) throw fail("a segment before any tensor");
        CheckpointSegment s;
        ok = static_cast<bool>(ls >> s.file >> s.offset >> s.block.row0 >> s.block.rows >>
                               s.block.col0 >> s.block.cols >> std::hex >> s.checksum);
        if (ok && (s.block.row0 < 0 || s.block.rows < 1 || s.block.col0 < 0 || s.block.cols < 1 ||
                   s.block.row0 > tensor->rows || s.block.rows > tensor->rows - s.block.row0 ||
                   s.block.col0 > tensor->cols || s.block.cols > tensor->cols - s.block.col0))
          throw fail(fmt::format("segment outside tensor '{}' of {}×{}", tensor->name, tensor->rows,
                                 tensor->cols));
        tensor->segments.push_back(s);
      } else if (kind == "end") {
        ended = true;
      } else {
        throw fail(fmt::format("unknown record '{}'", kind));
      }
      std::string extra;
      if (!ok || (ls >> extra)) throw fail("malformed record");
    }
    if (!ended)
      throw error(errc::invalid_argument, fmt::format("{} is truncated (no 'end' line)", what));
    if (m.save_id.size() != 16)
      throw error(errc::invalid_argument, fmt::format("{} has no save_id", what));
    for (auto const& [name, t] : m.tensors)
      for (auto const& s : t.segments)
        if (!m.file(s.file))
          throw error(errc::invalid_argument,
                      fmt::format("{}: tensor '{}' has a segment in {}, which is not a listed file",
                                  what, name, s.file));
    return m;
  }

  /// The listed file `name`, or null.
  CheckpointFile const* file(std::string const& name) const {
    for (auto const& f : files)
      if (f.name == name) return &f;
    return nullptr;
  }

  /// Throws naming the first setting in which the checkpoint's model differs from `model`
  /// ("checkpoint has num_layers = 4, the model 2"), or that one of them lacks.
  void check_model(ConfigEntries const& model) const {
    for (auto const& [k, v] : model) {
      auto const saved = info.model.get(k);
      if (!saved)
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint iteration {} does not record the model's {} (the model "
                                "has {})",
                                iteration, k, v));
      if (*saved != v)
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint has {} = {}, the model {}", k, *saved, v));
    }
    for (auto const& [k, v] : info.model)
      if (!model.get(k))
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint has {} = {}, which the model does not set", k, v));
  }

 private:
  static std::optional<DType> parse_dtype(std::string const& s) {
    for (DType d : {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64, DType::u8})
      if (moefold::name(d) == s) return d;
    return std::nullopt;
  }
};

}  // namespace v0
}  // namespace moefold
