#pragma once
/// \file
/// The safetensors format (Hugging Face's tensor files), written and read by moefold itself.
///
///   bytes [0, 8)        N, the length of the header, unsigned 64-bit little-endian
///   bytes [8, 8 + N)    the header: a JSON object (UTF-8, padded with spaces to a multiple of 8)
///                         {"__metadata__": {"format": "pt"},
///                          "<name>": {"dtype": "F32", "shape": [rows, cols],
///                                     "data_offsets": [begin, end]}, ...}
///   bytes [8 + N, …)    the data section: each tensor's elements row-major, little-endian,
///                       at [begin, end) relative to the section's start; the tensors cover it
///                       exactly (no gap, no overlap)
///
/// dtypes: F32, F64, BF16, I32, I64, U8 (moefold's `DType`s). The writer puts the tensors in
/// name order and the header's keys sorted, so equal tensors give byte-identical files.
/// The header is JSON through nlohmann-json: this header needs it (target `moefold::interop`).

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian: moefold writes it from memory as it is");

/// The safetensors name of a dtype ("F32", "F64", "BF16", "I32", "I64", "U8").
constexpr std::string_view safetensors_dtype(DType d) noexcept {
  switch (d) {
    case DType::f32:
      return "F32";
    case DType::f64:
      return "F64";
    case DType::bf16:
      return "BF16";
    case DType::i32:
      return "I32";
    case DType::i64:
      return "I64";
    case DType::u8:
      return "U8";
  }
  return "?";
}

/// The dtype of a safetensors name, if moefold has it.
inline std::optional<DType> parse_safetensors_dtype(std::string_view s) {
  for (DType d : {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64, DType::u8})
    if (safetensors_dtype(d) == s) return d;
  return std::nullopt;
}

/// A tensor of a safetensors file: its dtype, shape and byte range in the data section.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< [begin, end) relative to the data section

  /// The product of the shape (1 for a scalar, shape []).
  std::int64_t elements() const noexcept {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

/// Collects tensors and writes them as one safetensors file.
class SafetensorsWriter {
 public:
  /// Adds tensor `name` of `shape` whose elements (row-major) are `data`. Throws when the name
  /// is taken or empty, or the shape does not hold `data.size()` elements.
  template <CommScalar T>
  void add(std::string const& name, std::vector<std::int64_t> shape, std::span<T const> data) {
    auto const* p = reinterpret_cast<char const*>(data.data());
    add_bytes(name, dtype_of<T>(), std::move(shape), std::vector<char>(p, p + data.size_bytes()));
  }

  /// Adds tensor `name` from its raw little-endian bytes.
  void add_bytes(std::string const& name, DType dtype, std::vector<std::int64_t> shape,
                 std::vector<char> bytes) {
    MOEFOLD_EXPECTS(!name.empty() && name != "__metadata__",
                    "safetensors: '{}' cannot name a tensor", name);
    MOEFOLD_EXPECTS(!tensors_.count(name), "safetensors: tensor '{}' is added twice", name);
    SafetensorsEntry e{name, dtype, std::move(shape), 0, 0};
    std::string const shape_text = fmt::format("{}", fmt::join(e.shape, ", "));
    for (auto s : e.shape)
      MOEFOLD_EXPECTS(s >= 0, "safetensors: tensor '{}' has a negative extent in shape [{}]", name,
                      shape_text);
    MOEFOLD_EXPECTS(static_cast<std::uint64_t>(e.elements()) * size_of(dtype) == bytes.size(),
                    "safetensors: tensor '{}' of shape [{}] {} needs {} bytes, got {}", name,
                    shape_text, safetensors_dtype(dtype),
                    static_cast<std::uint64_t>(e.elements()) * size_of(dtype), bytes.size());
    tensors_.emplace(name, std::pair{std::move(e), std::move(bytes)});
  }

  /// String metadata of the file (`__metadata__`); holds {"format": "pt"} from the start.
  std::map<std::string, std::string>& metadata() noexcept { return metadata_; }

  /// The whole file: header length, header, data.
  std::vector<char> bytes() const {
    nlohmann::json header = nlohmann::json::object();
    header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (auto const& [name, t] : tensors_) {  // name order
      auto const n = static_cast<std::uint64_t>(t.second.size());
      header[name] = {{"dtype", safetensors_dtype(t.first.dtype)},
                      {"shape", t.first.shape},
                      {"data_offsets", {offset, offset + n}}};
      offset += n;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
    std::vector<char> out;
    out.reserve(8 + text.size() + offset);
    for (int k = 0; k < 8; ++k)  // the header length, little-endian
      out.push_back(static_cast<char>((std::uint64_t{text.size()} >> (8 * k)) & 0xff));
    out.insert(out.end(), text.begin(), text.end());
    for (auto const& [name, t] : tensors_) out.insert(out.end(), t.second.begin(), t.second.end());
    return out;
  }

  /// Writes the file to `path` (through a temporary file renamed into place).
  void write(std::filesystem::path const& path) const {
    auto const data = bytes();
    auto const tmp = std::filesystem::path(path.string() + ".tmp");
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out.write(data.data(), static_cast<std::streamsize>(data.size()));
      if (!out.flush())
        throw error(errc::invalid_argument, fmt::format("cannot write {}", tmp.string()));
    }
    std::filesystem::rename(tmp, path);
  }

 private:
  std::map<std::string, std::string> metadata_{{"format", "pt"}};
  std::map<std::string, std::pair<SafetensorsEntry, std::vector<char>>> tensors_;
};

/// A safetensors file opened for reading: its header is parsed and checked on open; tensors are
/// read one at a time.
class SafetensorsFile {
 public:
  /// The most header bytes accepted (the limit of Hugging Face's own reader).
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

  /// Opens `path`. Throws naming the file and the rule when it is shorter than its header
  /// length says, the header is not a JSON object of tensors, a dtype is unknown, a shape and
  /// its byte range disagree, or the byte ranges do not tile the data section exactly.
  static SafetensorsFile open(std::filesystem::path const& path) {
    SafetensorsFile f;
    f.path_ = path;
    std::ifstream in(path, std::ios::binary);
    if (!in) throw f.fail("cannot be opened");
    std::error_code ec;
    auto const size = static_cast<std::uint64_t>(std::filesystem::file_size(path, ec));
    if (ec) throw f.fail("cannot be opened");
    if (size < 8)
      throw f.fail(
          fmt::format("is truncated: {} bytes, fewer than the 8 of the header length", size));
    std::uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    if (n > size - 8)
      throw f.fail(fmt::format("has a truncated header: its length says {} bytes but {} follow", n,
                               size - 8));
    if (n > kMaxHeaderBytes)
      throw f.fail(
          fmt::format("has a header of {} bytes, more than the limit of {}", n, kMaxHeaderBytes));
    std::string text(n, '\0');
    in.read(text.data(), static_cast<std::streamsize>(n));
    f.data_start_ = 8 + n;
    f.parse_header(text, size - 8 - n);
    return f;
  }

  std::filesystem::path const& path() const noexcept { return path_; }
  /// The tensors' names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (auto const& [k, v] : entries_) out.push_back(k);
    return out;
  }
  bool contains(std::string const& name) const { return entries_.count(name) != 0; }
  /// The tensor `name`; throws naming the file when it has none.
  SafetensorsEntry const& entry(std::string const& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) throw fail(fmt::format("has no tensor '{}'", name));
    return it->second;
  }
  std::map<std::string, std::string> const& metadata() const noexcept { return metadata_; }

  /// The elements of tensor `name`, row-major, converted from its dtype to `T`.
  template <class T>
  std::vector<T> read(std::string const& name) const {
    auto const& e = entry(name);
    std::vector<char> raw(e.end - e.begin);
    std::ifstream in(path_, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(data_start_ + e.begin));
    in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
    if (!in || static_cast<std::size_t>(in.gcount()) != raw.size())
      throw fail(fmt::format("could not be read at tensor '{}'", name));
    std::vector<T> out(static_cast<std::size_t>(e.elements()));
    std::size_t const es = size_of(e.dtype);
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = detail::element_as<T>(e.dtype, raw.data() + i * es);
    return out;
  }

 private:
  error fail(std::string const& why) const {
    return error(errc::invalid_argument,
                 fmt::format("safetensors file {} {}", path_.string(), why));
  }

  void parse_header(std::string const& text, std::uint64_t data_bytes) {
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text);
    } catch (nlohmann::json::exception const& e) {
      throw fail(fmt::format("has a header that is not JSON ({})", e.what()));
    }
    if (!header.is_object()) throw fail("has a header that is not a JSON object");
    for (auto const& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) throw fail("has a __metadata__ that is not an object");
        for (auto const& [k, v] : value.items()) {
          if (!v.is_string())
            throw fail(fmt::format("has __metadata__ '{}' that is not a string", k));
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      entries_[key] = parse_entry(key, value, data_bytes);
    }
    // The byte ranges must tile [0, data_bytes): sorted by start, each begins where the last ended.
    std::vector<SafetensorsEntry const*> order;
    for (auto const& [k, e] : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) {
      return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
    });
    std::uint64_t at = 0;
    std::string prev;
    for (auto const* e : order) {
      if (e->begin < at)
        throw fail(
            fmt::format("has overlapping tensors: '{}' [{}, {}) starts before '{}' ends at {}",
                        e->name, e->begin, e->end, prev, at));
      if (e->begin > at)
        throw fail(fmt::format("has a gap: data bytes [{}, {}) belong to no tensor", at, e->begin));
      at = e->end;
      prev = e->name;
    }
    if (at != data_bytes)
      throw fail(fmt::format("has {} data bytes but its tensors cover [0, {})", data_bytes, at));
  }

  SafetensorsEntry parse_entry(std::string const& name, nlohmann::json const& v,
                               std::uint64_t data_bytes) const {
    auto bad = [&](std::string const& why) {
      return fail(fmt::format("tensor '{}': {}", name, why));
    };
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      throw bad("needs an object with dtype, shape and data_offsets");
    SafetensorsEntry e;
    e.name = name;
    if (!v["dtype"].is_string()) throw bad("dtype is not a string");
    auto const dtype = v["dtype"].get<std::string>();
    auto const d = parse_safetensors_dtype(dtype);
    if (!d)
      throw bad(
          fmt::format("unknown dtype '{}' (moefold reads F32, F64, BF16, I32, I64, U8)", dtype));
    e.dtype = *d;
    if (!v["shape"].is_array()) throw bad("shape is not an array");
    for (auto const& s : v["shape"]) {
      if (!s.is_number_unsigned())
        throw bad(fmt::format("shape {} is not of sizes >= 0", v["shape"].dump()));
      e.shape.push_back(s.get<std::int64_t>());
    }
    auto const& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      throw bad(fmt::format("data_offsets {} is not [begin, end]", off.dump()));
    e.begin = off[0].get<std::uint64_t>();
    e.end = off[1].get<std::uint64_t>();
    if (e.begin > e.end || e.end > data_bytes)
      throw bad(fmt::format("data_offsets [{}, {}) out of range: the data section has {} bytes",
                            e.begin, e.end, data_bytes));
    auto const need = static_cast<std::uint64_t>(e.elements()) * size_of(e.dtype);
    if (e.end - e.begin != need)
      throw bad(fmt::format("data_offsets [{}, {}) hold {} bytes but shape [{}] of {} needs {}",
                            e.begin, e.end, e.end - e.begin, fmt::join(e.shape, ", "), dtype,
                            need));
    return e;
  }

  std::filesystem::path path_;
  std::uint64_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace v0
}  // namespace moefold
