#pragma once
// Checks shared by the tests of the `moefold` command-line tool (main thread only).

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>

#include "support/catch.hpp"
#include "support/run_command.hpp"

namespace moefold::test {

/// Invalid input: exit status 2, nothing on stdout, one line on stderr that contains `expected`.
inline void check_usage_error(CommandResult const& r, std::string const& expected) {
  CHECK(r.status == 2);
  CHECK(r.out.empty());
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find(expected) != std::string::npos);
}

/// The whole content of a text file ("" when it cannot be read).
inline std::string read_text(std::string const& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace moefold::test
