#include "input.hpp"

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold::cli {

long parse_integer(std::string_view what, std::string_view text, long lo, long hi) {
  long value = 0;
  char const* const end = text.data() + text.size();
  auto const [stop, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range)
    throw invalid_config(
        fmt::format("{} must be an integer between {} and {} (got {})", what, lo, hi, text));
  if (ec != std::errc() || stop != end || text.empty())
    throw invalid_config(fmt::format("{} must be an integer (got '{}')", what, text));
  if (value < lo)
    throw invalid_config(fmt::format("{} must be at least {} (got {})", what, lo, value));
  if (value > hi)
    throw invalid_config(fmt::format("{} must be at most {} (got {})", what, hi, value));
  return value;
}

long flag_integer(std::string_view flag, std::string_view text, long lo, long hi) {
  try {
    return parse_integer(flag, text, lo, hi);
  } catch (error const& e) {
    throw CLI::ValidationError(e.what());
  }
}

namespace {
struct FileCloser {
  void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};
}  // namespace

std::string read_text_file(std::string const& path, std::string_view what) {
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f)
    throw error(errc::invalid_argument,
                fmt::format("cannot read {} file '{}': {}", what, path, std::strerror(errno)));
  std::string out;
  char buf[65536];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f.get())) > 0) out.append(buf, n);
  if (std::ferror(f.get()))
    throw error(errc::invalid_argument,
                fmt::format("cannot read {} file '{}': {}", what, path, std::strerror(errno)));
  return out;
}

void write_text_file(std::string_view what, std::string const& path, std::string const& content) {
  if (path.empty())
    throw error(errc::invalid_argument, fmt::format("{} needs a file name (got '')", what));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr)
    throw error(errc::invalid_argument,
                fmt::format("cannot write {} '{}': {}", what, path, std::strerror(errno)));
  bool const written = std::fwrite(content.data(), 1, content.size(), f) == content.size();
  int const write_errno = errno;
  if (std::fclose(f) != 0 || !written)
    throw error(errc::invalid_argument, fmt::format("cannot write {} '{}': {}", what, path,
                                                    std::strerror(written ? errno : write_errno)));
}

}  // namespace moefold::cli
