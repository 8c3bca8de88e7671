#include "convert_command.hpp"

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/interop/hf_mixtral.hpp"
#include "moefold/train/checkpoint.hpp"

namespace moefold::cli {

namespace {
struct ConvertOptions {
  std::string to, from;
  std::string source, target;
  std::optional<long> step;
};

int run_convert(ConvertOptions const& o) {
  if (o.to.empty() == o.from.empty())
    throw error(errc::invalid_argument,
                "moefold convert needs exactly one of --to hf (moefold → Hugging Face) and "
                "--from hf (Hugging Face → moefold)");
  std::string const& format = o.to.empty() ? o.from : o.to;
  if (format != "hf")
    throw error(errc::invalid_argument,
                fmt::format("moefold convert: unknown format '{}' (the one format is hf: "
                            "Hugging Face MixtralForCausalLM)",
                            format));
  if (!o.to.empty()) {
    if (o.step && *o.step < 0)
      throw error(errc::invalid_argument,
                  fmt::format("--ckpt-step must be an iteration >= 0 (got {})", *o.step));
    auto const ckpt =
        o.step ? CheckpointReader::open(o.source, *o.step) : CheckpointReader::open(o.source);
    export_hf_mixtral(ckpt, o.target);
    fmt::print("moefold convert: iteration {} of {} -> {}/config.json, {}/model.safetensors\n",
               ckpt.step(), o.source, o.target, o.target);
    return 0;
  }
  if (o.step)
    throw error(errc::invalid_argument,
                "--ckpt-step picks the iteration of a moefold checkpoint (--to hf); a Hugging "
                "Face directory has one model");
  import_hf_mixtral(o.source, o.target);
  fmt::print(
      "moefold convert: {} -> {} iteration 0 (parameters only: load with --finetune or "
      "--no-load-optim)\n",
      o.source, o.target);
  return 0;
}
}  // namespace

Command add_convert_command(CLI::App& app) {
  auto options = std::make_shared<ConvertOptions>();
  ConvertOptions& o = *options;
  CLI::App* cmd = app.add_subcommand(
      "convert",
      "Convert a moefold checkpoint to a Hugging Face Mixtral directory (--to hf CKPT_DIR "
      "OUT_DIR) or back (--from hf HF_DIR CKPT_DIR)");
  cmd->add_option("--to", o.to, "hf: write a Hugging Face MixtralForCausalLM directory");
  cmd->add_option("--from", o.from, "hf: read a Hugging Face MixtralForCausalLM directory");
  cmd->add_option("source", o.source, "CKPT_DIR (--to) or HF_DIR (--from)")->required();
  cmd->add_option("target", o.target, "OUT_DIR (--to) or CKPT_DIR (--from)")->required();
  cmd->add_option("--ckpt-step", o.step, "Iteration of CKPT_DIR to convert (default: latest)");
  return {cmd, [options] { return run_convert(*options); }};
}

}  // namespace moefold::cli
