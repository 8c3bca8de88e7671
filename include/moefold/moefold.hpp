#pragma once
/// \file
/// moefold in one include: every host-side public header of the components this build has, as
/// `moefold/config.hpp` records them (`MOEFOLD_HAS_MPI`, `_CUDA`, `_NCCL`, `_INTEROP`). Link
/// `moefold::moefold`, which carries those components.
///
///   #include <moefold/moefold.hpp>
///   auto fold = moefold::FoldedMapping::from({.world = 8, .tp = 2, .cp = 2, .pp = 2, .ep = 4});
///
/// Headers under `detail/` are not part of it; CUDA kernels are reached through the
/// declarations of `exec/` (the host compiler never sees CUDA headers).

#include "moefold/config.hpp"

// core
#include "moefold/core/bf16.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/format.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/host_cache.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/memory_space.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"

// mesh
#include "moefold/mesh/axis.hpp"
#include "moefold/mesh/folded_mapping.hpp"
#include "moefold/mesh/group.hpp"
#include "moefold/mesh/order.hpp"
#include "moefold/mesh/process_mesh.hpp"
#include "moefold/mesh/rank_group.hpp"

// comm
#include "moefold/comm/communicator.hpp"
#include "moefold/comm/inproc/communicator.hpp"
#include "moefold/comm/inproc/run.hpp"
#if MOEFOLD_HAS_MPI
#include "moefold/comm/mpi/communicator.hpp"
#include "moefold/comm/mpi/environment.hpp"
#include "moefold/comm/mpi/run.hpp"
#endif
#if MOEFOLD_HAS_NCCL
#include "moefold/comm/nccl_info.hpp"
#endif
#include "moefold/comm/process_groups.hpp"
#include "moefold/comm/traffic.hpp"

// exec
#include "moefold/exec/blas.hpp"
#include "moefold/exec/cpu.hpp"
#if MOEFOLD_HAS_CUDA
#include "moefold/exec/cuda_device.hpp"
#endif
#include "moefold/exec/grouped_gemm.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/exec/shuffled_cpu.hpp"
#include "moefold/exec/simulated_device.hpp"

// ops
#include "moefold/ops/activations.hpp"
#include "moefold/ops/adamw.hpp"
#include "moefold/ops/aux_loss.hpp"
#include "moefold/ops/bias.hpp"
#include "moefold/ops/capacity.hpp"
#include "moefold/ops/cross_entropy.hpp"
#include "moefold/ops/dispatch.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/embedding.hpp"
#include "moefold/ops/finite.hpp"
#include "moefold/ops/flash_attention.hpp"
#include "moefold/ops/tile_product.hpp"
#include "moefold/ops/gate.hpp"
#include "moefold/ops/gradients.hpp"
#include "moefold/ops/jitter.hpp"
#include "moefold/ops/permute.hpp"
#include "moefold/ops/rms_norm.hpp"
#include "moefold/ops/rope.hpp"
#include "moefold/ops/router.hpp"
#include "moefold/ops/row_scale.hpp"
#include "moefold/ops/sinkhorn.hpp"
#include "moefold/ops/view_args.hpp"

// nn
#include "moefold/nn/attention.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/context_parallel.hpp"
#include "moefold/nn/decoder_layer.hpp"
#include "moefold/nn/dense_mlp.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/nn/rms_norm.hpp"
#include "moefold/nn/rotary.hpp"
#include "moefold/nn/row_parallel_linear.hpp"
#include "moefold/nn/sequence_shard.hpp"
#include "moefold/nn/vocab_parallel_cross_entropy.hpp"
#include "moefold/nn/vocab_parallel_embedding.hpp"

// moe
#include "moefold/moe/all_gather_dispatcher.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/aux_losses.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/grouped_gemm_experts.hpp"
#include "moefold/moe/input_jitter.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/moe/permutation.hpp"
#include "moefold/moe/router.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/moe/score_functions.hpp"
#include "moefold/moe/sinkhorn.hpp"
#include "moefold/moe/token_dispatcher.hpp"
#include "moefold/moe/top_k.hpp"

// pipeline
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/pipeline/pipeline_action.hpp"
#include "moefold/pipeline/pipeline_schedule.hpp"
#include "moefold/pipeline/simulation.hpp"

// train
#include "moefold/train/adamw.hpp"
#include "moefold/train/checkpoint.hpp"
#include "moefold/train/checkpoint_config.hpp"
#include "moefold/train/checkpoint_metadata.hpp"
#include "moefold/train/decoder_stage.hpp"
#include "moefold/train/distributed_optimizer.hpp"
#include "moefold/train/finalize_model_grads.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "moefold/train/lr_schedule.hpp"
#include "moefold/train/mfu.hpp"
#include "moefold/train/microbatch_data.hpp"
#include "moefold/train/text_corpus.hpp"
#include "moefold/train/training_state.hpp"

// plan
#include "moefold/plan/cluster.hpp"
#include "moefold/plan/cost_model.hpp"
#include "moefold/plan/flops.hpp"
#include "moefold/plan/model.hpp"
#include "moefold/plan/placement.hpp"
#include "moefold/plan/planner.hpp"
#include "moefold/plan/state_memory.hpp"

// interop
#if MOEFOLD_HAS_INTEROP && __has_include(<nlohmann/json.hpp>)  // component interop
#include "moefold/interop/hf_mixtral.hpp"
#include "moefold/interop/mixtral_config.hpp"
#include "moefold/interop/safetensors.hpp"
#endif
