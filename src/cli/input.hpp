#pragma once
// Checked input for the `moefold` tool: integer flags with a type and range check, and text files
// read or written with errors that name the file and the system's reason. Every function throws
// moefold::error (invalid_config for a bad value) and never exits, so tests and fuzzers can call
// them on any string.

#include <optional>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>

namespace moefold::cli {

/// The integer type behind a flag's target: `T`, or `T` of an `std::optional<T>`.
template <class T>
struct FlagInteger {
  using type = T;
};
template <class T>
struct FlagInteger<std::optional<T>> {
  using type = T;
};

/// `text` as an integer in [lo, hi]. Throws invalid_config naming `what` and the value when
/// `text` is not an integer ("32.7", "1e30", "two"), does not fit ("2147483648") or is out of
/// range: "--gpus must be at least 1 (got 0)".
long parse_integer(std::string_view what, std::string_view text, long lo, long hi);

/// `parse_integer` for a flag's value while CLI11 parses: the same check and message, thrown as
/// CLI::ValidationError so that a bad command line always ends in a CLI::ParseError.
long flag_integer(std::string_view flag, std::string_view text, long lo, long hi);

/// Adds an integer flag to `cmd` that stores into `target` (an integer, or an optional one that
/// stays empty unless the flag is given) after `flag_integer`, named by the flag's first long
/// name. `target` must outlive the parse.
template <class Target>
CLI::Option* add_integer(CLI::App& cmd, std::string const& names, Target& target, long lo, long hi,
                         std::string const& help) {
  std::string const what = "--" + names.substr(names.find_first_not_of('-'),
                                               names.find(',') - names.find_first_not_of('-'));
  return cmd
      .add_option_function<std::string>(
          names,
          [&target, what, lo, hi](std::string const& text) {
            target =
                static_cast<typename FlagInteger<Target>::type>(flag_integer(what, text, lo, hi));
          },
          help)
      ->type_name("INT");
}

/// The content of the file at `path`; throws error naming `what`, the path and strerror.
std::string read_text_file(std::string const& path, std::string_view what);

/// Writes `content` to `path` (flag `what`, e.g. "--svg"); throws error naming the flag, the
/// path and strerror when the file cannot be opened, written or closed.
void write_text_file(std::string_view what, std::string const& path, std::string const& content);

}  // namespace moefold::cli
