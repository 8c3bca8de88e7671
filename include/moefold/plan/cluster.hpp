#pragma once
/// \file
/// `ClusterSpec`: what the planner needs to know about the machines (GPUs per node, peak dense
/// BF16 throughput, HBM, NVLink and network links), with the presets `h100` (the paper's Eos) and
/// `h200`.

#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// A homogeneous GPU cluster: nodes of `gpus_per_node` GPUs joined by NVLink inside a node and by
/// one network port per GPU between nodes. Bandwidths are per GPU and per direction.
struct ClusterSpec {
  std::string name = "custom";       ///< a label for reports
  int gpus_per_node = 8;             ///< size of the NVLink domain
  double peak_tflops = 989.5;        ///< peak dense BF16 TFLOP/s per GPU (the MFU denominator)
  double hbm_gb = 80.0;              ///< HBM capacity per GPU, in 10⁹ bytes
  double hbm_tb_per_s = 3.35;        ///< HBM bandwidth per GPU, in 10¹² bytes/s
  double nvlink_gb_per_s = 450.0;    ///< NVLink bandwidth per GPU per direction, in 10⁹ bytes/s
  double nvlink_latency_us = 8.0;    ///< latency of one collective step inside a node
  double network_gb_per_s = 50.0;    ///< inter-node bandwidth per GPU per direction (400 Gb/s = 50)
  double network_latency_us = 20.0;  ///< latency of one collective step across nodes

  /// Largest NVLink domain accepted: 1024 GPUs (NVL72 has 72, the announced NVL576 has 576).
  /// Placement work grows with its square.
  static constexpr int kMaxGpusPerNode = 1024;

  /// Throws `invalid_config` naming the first field that is not positive (or too large).
  void validate() const {
    auto positive = [&](double v, std::string_view what) {
      if (!(v > 0))
        throw invalid_config(
            fmt::format("cluster '{}': {} must be positive (got {})", name, what, v));
    };
    positive(gpus_per_node, "gpus_per_node");
    if (gpus_per_node > kMaxGpusPerNode)
      throw invalid_config(fmt::format("cluster '{}': gpus_per_node must be at most {} (got {})",
                                       name, kMaxGpusPerNode, gpus_per_node));
    positive(peak_tflops, "peak_tflops");
    positive(hbm_gb, "hbm_gb");
    positive(hbm_tb_per_s, "hbm_tb_per_s");
    positive(nvlink_gb_per_s, "nvlink_gb_per_s");
    positive(network_gb_per_s, "network_gb_per_s");
    if (nvlink_latency_us < 0 || network_latency_us < 0)
      throw invalid_config(fmt::format("cluster '{}': latencies must not be negative", name));
  }
};

/// The paper's cluster (NVIDIA Eos): DGX H100, 8 GPUs per node, 989.5 TFLOP/s, 80 GB at
/// 3.35 TB/s, NVLink 4 at 450 GB/s per direction, 400 Gb/s InfiniBand per GPU.
inline ClusterSpec h100_cluster() {
  return {.name = "h100",
          .gpus_per_node = 8,
          .peak_tflops = 989.5,
          .hbm_gb = 80.0,
          .hbm_tb_per_s = 3.35,
          .nvlink_gb_per_s = 450.0,
          .nvlink_latency_us = 8.0,
          .network_gb_per_s = 50.0,
          .network_latency_us = 20.0};
}

/// H200 nodes: the H100's compute and links with 141 GB of HBM at 4.8 TB/s.
inline ClusterSpec h200_cluster() {
  ClusterSpec c = h100_cluster();
  c.name = "h200";
  c.hbm_gb = 141.0;
  c.hbm_tb_per_s = 4.8;
  return c;
}

/// Names of the cluster presets.
inline std::vector<std::string> cluster_preset_names() { return {"h100", "h200"}; }

/// The preset called `name` (`h100` or `h200`); throws `invalid_config` for any other name.
inline ClusterSpec cluster_preset(std::string_view name) {
  if (name == "h100") return h100_cluster();
  if (name == "h200") return h200_cluster();
  throw invalid_config(
      fmt::format("unknown cluster preset '{}' (presets: h100, h200; or give a JSON file)", name));
}

}  // namespace v0
}  // namespace moefold
