// The checks before any work that look at the machine: the memory a request needs and the paths
// on the command line.
#include "preflight.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold::train_demo {

namespace {

namespace fs = std::filesystem;

/// The memory this machine offers: physical memory, or the cgroup's limit when lower.
double machine_memory() {
  double bytes =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  std::ifstream cgroup("/sys/fs/cgroup/memory.max");
  double limit = 0;
  if (cgroup >> limit && limit > 0) bytes = std::min(bytes, limit);
  return bytes;
}

double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

[[noreturn]] void path_error(char const* flag, fs::path const& p, std::string const& reason) {
  throw invalid_config(fmt::format("{} '{}': {}", flag, p.string(), reason));
}

/// Reads the whole file, so that a file the kernel refuses to read fails here, named.
void check_readable(char const* flag, fs::path const& file) {
  std::FILE* f = std::fopen(file.c_str(), "rb");
  if (!f) path_error(flag, file, fmt::format("cannot open: {}", std::strerror(errno)));
  static thread_local char buffer[1 << 16];
  while (std::fread(buffer, 1, sizeof buffer, f) == sizeof buffer) {
  }
  int const err = std::ferror(f) ? errno : 0;
  std::fclose(f);
  if (err != 0) path_error(flag, file, fmt::format("cannot read: {}", std::strerror(err)));
}

/// `dir` is a writable directory, or can be created as one (nothing is created here).
void check_writable_dir(char const* flag, fs::path const& dir) {
  std::error_code ec;
  fs::path existing = fs::absolute(dir, ec);
  while (!fs::exists(existing, ec) && existing.has_relative_path())
    existing = existing.parent_path();
  if (!fs::is_directory(existing, ec))
    path_error(flag, dir,
               existing == fs::absolute(dir, ec)
                   ? std::string("not a directory")
                   : fmt::format("cannot be created: '{}' is not a directory", existing.string()));
  if (::access(existing.c_str(), W_OK | X_OK) != 0)
    path_error(flag, dir,
               fmt::format("cannot write to '{}': {}", existing.string(), std::strerror(errno)));
}

}  // namespace

double memory_estimate(TrainOptions const& o) {
  auto const d = [](auto x) { return static_cast<double>(x); };
  double const h = d(o.hidden), layers = d(o.num_layers), s = d(o.seq), mb = d(o.micro_batch);
  double const vocab = d(o.padded_vocab());
  double const head_dim = h / std::max(1, o.heads);
  // One replica of the weights, by class: dense ones are replicated over DP·CP, experts over EDP.
  double const dense = 2 * vocab * h + h +
                       layers * (2 * h + h * head_dim * (o.heads + 2.0 * o.kv_groups) + h * h +
                                 d(o.num_experts) * h + 3 * d(o.shared_expert_ffn) * h);
  double const expert = layers * d(o.num_experts) * 3 * d(o.moe_ffn) * h;
  double const world = d(o.world > 0 ? o.world : o.tp * o.cp * o.pp);
  double const dp = std::max(1.0, world / d(o.tp * o.cp * o.pp));
  double const edp = std::max(1.0, world / d(o.ep * o.etp * o.pp));
  // Every replica holds its parameters (4 bytes, 2 with --bf16) and FP32 gradients; the two
  // FP32 AdamW moments (and with --bf16 the FP32 main parameters) are held by every replica, or
  // with the distributed optimizer once per optimizer instance (with the reduced FP32 gradient
  // shards).
  double const value = o.bf16 ? 2 : 4;
  double const state_per_element = o.bf16 ? 12 : 8;
  auto const bytes = [&](double elements, double replicas) {
    double const state = o.use_distributed_optimizer
                             ? (state_per_element + 4) * d(o.num_distributed_optimizer_instances)
                             : state_per_element * replicas;
    return elements * ((value + 4) * replicas + state);
  };
  double const weights = bytes(dense, dp * d(o.cp)) + bytes(expert, edp);
  // Activations each layer keeps of its last forward (attention scores, four hidden-size
  // tensors, the experts' 3·FFN per routed token) and the output logits, for one microbatch of
  // every DP replica.
  double const per_token = 4 * h + d(o.topk) * 3 * d(o.moe_ffn);
  double const activations = dp * mb * s * (layers * (d(o.heads) * s + per_token) + vocab) * value;
  return weights + activations;
}

void check_memory(TrainOptions const& o) {
  double const need_bytes = memory_estimate(o);
  double const share = o.backend == Backend::inproc ? need_bytes : need_bytes / o.world;
  double const have = machine_memory();
  if (share > have)
    throw invalid_config(fmt::format(
        "the run needs at least {:.1f} GiB of memory{} (parameters, gradients, AdamW moments and "
        "activations of {} layers of hidden size {}, {} experts of FFN {}, sequence {}, "
        "micro-batch {}) but this machine has {:.1f} GiB",
        gib(share), o.backend == Backend::inproc ? "" : " per rank", o.num_layers, o.hidden,
        o.num_experts, o.moe_ffn, o.seq, o.micro_batch, gib(have)));
}

void check_paths(TrainOptions const& o) {
  std::error_code ec;
  char const* data_flag = o.data_path.empty() ? "the data path" : "--data-path";
  fs::path const data = data_path_of(o);
  auto const status = fs::status(data, ec);
  if (ec) path_error(data_flag, data, ec.message());
  if (fs::is_directory(status)) {
    // The files TextCorpus::load reads: regular, not links, no extension.
    for (auto const& entry : fs::directory_iterator(data, ec)) {
      if (entry.is_regular_file() && !entry.is_symlink() && !entry.path().has_extension())
        check_readable(data_flag, entry.path());
    }
    if (ec) path_error(data_flag, data, ec.message());
  } else if (fs::is_regular_file(status)) {
    check_readable(data_flag, data);
  }
  check_writable_dir("--output-dir", o.output_dir);
  if (!o.save.empty()) check_writable_dir("--save", o.save);
  if (!o.log_json.empty()) {
    fs::path const log = o.log_json;
    if (fs::is_directory(log, ec)) path_error("--log-json", log, "is a directory");
    if (fs::exists(log, ec)) {
      if (::access(log.c_str(), W_OK) != 0)
        path_error("--log-json", log, fmt::format("cannot write: {}", std::strerror(errno)));
    } else {
      fs::path const parent = fs::absolute(log, ec).parent_path();
      if (!fs::is_directory(parent, ec))
        path_error("--log-json", log,
                   fmt::format("its directory '{}' does not exist", parent.string()));
      if (::access(parent.c_str(), W_OK | X_OK) != 0)
        path_error("--log-json", log,
                   fmt::format("cannot write to '{}': {}", parent.string(), std::strerror(errno)));
    }
  }
  if (!o.load.empty()) {
    auto const load = fs::status(o.load, ec);
    if (ec) path_error("--load", o.load, ec.message());
    if (!fs::is_directory(load)) path_error("--load", o.load, "not a directory");
  }
}

}  // namespace moefold::train_demo
