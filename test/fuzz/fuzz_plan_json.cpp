// Fuzz target: the model and cluster JSON of `moefold plan` (src/cli/plan_json.cpp), through
// the public parse_model / parse_cluster. The first byte picks which (even: model, odd:
// cluster); the rest is the JSON text. Invalid input must throw moefold::error.

#include <cstdint>
#include <string_view>

#include "moefold/core/error.hpp"
#include "plan_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  if (size == 0) return 0;
  std::string_view const text(reinterpret_cast<char const*>(data) + 1, size - 1);
  try {
    if (data[0] % 2 == 0)
      (void)moefold::cli::parse_model(text, "fuzz.json");
    else
      (void)moefold::cli::parse_cluster(text, "fuzz.json");
  } catch (moefold::error const&) {
  }
  return 0;
}
