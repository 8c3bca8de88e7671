#pragma once
// `moefold convert`: a moefold checkpoint (any folding) to a Hugging Face Mixtral directory
// (`--to hf CKPT_DIR OUT_DIR`), and back (`--from hf HF_DIR CKPT_DIR`). docs/interop.md.

#include <CLI/CLI.hpp>

#include "command.hpp"

namespace moefold::cli {

/// Registers `moefold convert` on `app`.
Command add_convert_command(CLI::App& app);

}  // namespace moefold::cli
