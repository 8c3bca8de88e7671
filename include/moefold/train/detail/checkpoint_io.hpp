#pragma once
/// \file
/// File primitives of checkpoints: FNV-1a-64 checksums, files written and flushed to disk
/// (fsync of the file and of its directory), byte ranges read back, and the strict
/// `latest_checkpointed_iteration.txt` format.

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

/// The header of every v2 checkpoint file: this magic, then the save id (16 hex digits).
inline constexpr char kCkptFileMagic[8] = {'M', 'O', 'E', 'F', 'C', 'K', 'P', '2'};
inline constexpr std::size_t kCkptHeaderBytes = 8 + 16;

/// FNV-1a-64, continued from `h` (so a file's checksum can be computed piece by piece).
inline std::uint64_t fnv1a(std::span<char const> bytes, std::uint64_t h = 0xcbf29ce484222325ull) {
  for (char c : bytes) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

[[noreturn]] inline void throw_io(std::string const& what, std::filesystem::path const& path) {
  throw error(errc::invalid_argument,
              fmt::format("{} {} failed: {}", what, path.string(), std::strerror(errno)));
}

/// Flushes directory `dir` to disk, so that renames and new entries in it survive a crash.
inline void fsync_directory(std::filesystem::path const& dir) {
  int const fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw_io("opening directory", dir);
  bool const ok = ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) throw_io("fsync of directory", dir);
}

/// A new file written piece by piece, with its running checksum; `close` flushes it to disk.
/// The destructor (on an error path) closes without flushing.
class CheckpointFileWriter {
 public:
  explicit CheckpointFileWriter(std::filesystem::path path) : path_(std::move(path)) {
    f_ = std::fopen(path_.c_str(), "wbx");  // "x": never reuse a file another save made
    if (f_ == nullptr) throw_io("creating", path_);
  }
  CheckpointFileWriter(CheckpointFileWriter const&) = delete;
  CheckpointFileWriter& operator=(CheckpointFileWriter const&) = delete;
  ~CheckpointFileWriter() {
    if (f_ != nullptr) std::fclose(f_);
  }

  void write(std::span<char const> bytes) {
    if (std::fwrite(bytes.data(), 1, bytes.size(), f_) != bytes.size()) throw_io("writing", path_);
    checksum_ = fnv1a(bytes, checksum_);
    size_ += bytes.size();
  }
  /// Flushes the file to disk and closes it.
  void close() {
    bool ok = std::fflush(f_) == 0;
    ok = ::fsync(::fileno(f_)) == 0 && ok;
    ok = std::fclose(f_) == 0 && ok;
    f_ = nullptr;
    if (!ok) throw_io("flushing", path_);
  }
  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t checksum() const noexcept { return checksum_; }

 private:
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
  std::uint64_t size_ = 0;
  std::uint64_t checksum_ = 0xcbf29ce484222325ull;
};

/// Writes `text` to `path` atomically: a temporary file beside it, flushed, renamed over
/// `path`, and the directory flushed.
inline void write_file_atomically(std::filesystem::path const& path, std::string const& text) {
  auto const tmp = std::filesystem::path(path.string() + ".tmp." + std::to_string(::getpid()));
  std::filesystem::remove(tmp);
  {
    CheckpointFileWriter w(tmp);
    w.write(std::span<char const>(text.data(), text.size()));
    w.close();
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec)
    throw error(errc::invalid_argument, fmt::format("renaming {} to {} failed: {}", tmp.string(),
                                                    path.string(), ec.message()));
  fsync_directory(path.parent_path());
}

/// The whole content of a (small) file.
inline std::string read_text_file(std::filesystem::path const& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error(errc::invalid_argument, fmt::format("cannot read {}", path.string()));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// Reads bytes [offset, offset + out.size()) of the open file `in` (named `path`).
inline void read_range(std::ifstream& in, std::filesystem::path const& path, std::uint64_t offset,
                       std::span<char> out) {
  in.clear();
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(out.data(), static_cast<std::streamsize>(out.size()));
  if (static_cast<std::size_t>(in.gcount()) != out.size())
    throw error(errc::invalid_argument,
                fmt::format("checkpoint file {} is truncated (cannot read {} bytes at offset {})",
                            path.string(), out.size(), offset));
}

/// The iteration in `latest_checkpointed_iteration.txt`: exactly a non-negative decimal
/// integer, optionally followed by one newline; anything else is an error naming the file and
/// its content.
inline std::int64_t parse_latest(std::string const& text, std::filesystem::path const& path) {
  std::string digits = text;
  if (!digits.empty() && digits.back() == '\n') digits.pop_back();
  bool ok = !digits.empty() && digits.size() <= 18;
  for (char c : digits) ok = ok && c >= '0' && c <= '9';
  if (!ok) {
    std::string shown;
    for (char c : text.substr(0, 40)) shown += c == '\n' ? std::string("\\n") : std::string(1, c);
    throw error(errc::invalid_argument,
                fmt::format("{} must hold exactly an iteration number, but holds '{}'",
                            path.string(), shown));
  }
  return std::stoll(digits);
}

/// Megatron's name of an iteration's directory.
inline std::string iter_name(std::int64_t step) { return fmt::format("iter_{:07d}", step); }

/// The iteration of a directory named exactly `iter_NNNNNNN` (7 or more digits), or −1.
inline std::int64_t iteration_of(std::string const& dir_name) {
  if (dir_name.size() < 12 || dir_name.rfind("iter_", 0) != 0) return -1;
  for (std::size_t i = 5; i < dir_name.size(); ++i)
    if (dir_name[i] < '0' || dir_name[i] > '9') return -1;
  return std::stoll(dir_name.substr(5));
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
