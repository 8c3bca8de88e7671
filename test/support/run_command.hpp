#pragma once
// Runs a shell command for tests of command-line tools: exit status, stdout and stderr.

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace moefold::test {

struct CommandResult {
  int status = -1;
  std::string out;
  std::string err;
};

inline CommandResult run_command(std::string const& command) {
  static int counter = 0;
  std::string const err_path =
      (std::filesystem::temp_directory_path() /
       ("moefold_test_stderr_" + std::to_string(::getpid()) + "_" + std::to_string(counter++)))
          .string();
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>" + err_path).c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buf{};
  std::size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) result.out.append(buf.data(), n);
  int const raw = ::pclose(pipe);
  result.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream err(err_path);
  std::stringstream ss;
  ss << err.rdbuf();
  result.err = ss.str();
  std::remove(err_path.c_str());
  return result;
}

}  // namespace moefold::test
