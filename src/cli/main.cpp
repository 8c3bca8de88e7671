// moefold: command-line tools for MoE Parallel Folding.
//   moefold groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1
//   moefold convert --to hf CKPT_DIR OUT_DIR     (docs/interop.md)
// Invalid input exits with status 2 and one line on stderr naming the broken rule; any other
// failure (out of memory, an unexpected exception) exits with status 1 and one line
// "moefold: error: ...". No exception leaves main.

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <vector>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "command.hpp"
#include "convert_command.hpp"
#include "groups_command.hpp"
#include "moefold/config.hpp"
#include "moefold/core/error.hpp"
#include "plan_command.hpp"
#include "schedule_command.hpp"

namespace {

/// Prints the first line of `what` to stderr without allocating (the last resort must not fail
/// itself).
void report(char const* prefix, char const* what) noexcept {
  char const* const newline = std::strchr(what, '\n');
  int const n = static_cast<int>(newline ? newline - what : std::strlen(what));
  std::fprintf(stderr, "moefold: %s%.*s\n", prefix, n, what);
}

int run(int argc, char** argv) {
  CLI::App app{"moefold: process groups and tools for MoE Parallel Folding", "moefold"};
  app.set_version_flag("--version", MOEFOLD_VERSION_STRING);
  app.require_subcommand(1);
  // One line per sub-command.
  std::vector<moefold::cli::Command> const commands{
      moefold::cli::add_groups_command(app),
      moefold::cli::add_plan_command(app),
      moefold::cli::add_schedule_command(app),
      moefold::cli::add_convert_command(app),
  };
  try {
    app.parse(argc, argv);
    for (auto const& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (CLI::ParseError const& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    report("", e.what());
    return 2;
  } catch (moefold::error const& e) {
    report("", e.what());
    return 2;
  }
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // The last resort: anything not a usage error ends here, as one line and status 1.
  try {
    int const status = run(argc, argv);
    // Buffered output reaches the file only now: a full disk or a closed pipe must not exit 0.
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
      report("error: cannot write to standard output: ", std::strerror(errno));
      return 1;
    }
    return status;
  } catch (std::bad_alloc const&) {
    report("error: ", "out of memory (std::bad_alloc)");
  } catch (std::exception const& e) {
    report("error: ", e.what());
  } catch (...) {
    report("error: ", "unknown exception");
  }
  return 1;
}
