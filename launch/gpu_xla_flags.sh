# shellcheck shell=bash
# XLA / JAX settings for NVIDIA H100/H200 (Hopper) runs. Sourced by launch/gpu_single_host.sh and
# launch/slurm_multinode.sbatch; do not run it directly.
#
# Inputs (environment, all optional):
#   NUM_NODES       hosts in the job         (default: $SLURM_NNODES, else 1)
#   GPUS_PER_NODE   GPUs per host             (default: $SLURM_GPUS_PER_NODE, else 8)
#   XLA_COMBINE_THRESHOLD_BYTES  collective-combining budget (default 1 GiB, as MaxText's GPU scripts)
#   XLA_FLAGS       anything already set is appended last, so it overrides the flags below.
# Every flag is checked against the installed jaxlib by tests/test_launch_scripts.py (XLA aborts on
# unknown flags); names and defaults live in xla/debug_options_flags.cc.

_rsllm_nodes=${NUM_NODES:-${SLURM_NNODES:-1}}
_rsllm_gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
_rsllm_gpus=${_rsllm_gpus##*:}  # SLURM may say "h100:8"
_rsllm_threshold=${XLA_COMBINE_THRESHOLD_BYTES:-1073741824}
_rsllm_shards=$((_rsllm_nodes * _rsllm_gpus))

_rsllm_flags=(
  # Let the scheduler move async collectives (FSDP all-gathers / reduce-scatters) so they overlap compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # cuBLAS(Lt) for matmuls instead of Triton-generated GEMMs: the tuned, predictable path for bf16 on Hopper.
  --xla_gpu_enable_triton_gemm=false
  # Empty list = no CUDA-graph command buffers: steps are large, and graphs add capture time and memory.
  --xla_gpu_enable_command_buffer=
  # Run collectives on a high-priority stream so compute kernels cannot starve them.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Merge small all-reduces (replicated LoRA/projector grads) into few large NCCL calls.
  --xla_gpu_all_reduce_combine_threshold_bytes="${_rsllm_threshold}"
  # Merge per-tensor FSDP parameter all-gathers of a layer; sized per shard (each gathers 1/N of the output).
  --xla_gpu_all_gather_combine_threshold_bytes="$((_rsllm_threshold / _rsllm_shards))"
  # Merge per-tensor gradient reduce-scatters; half the all-gather budget, as MaxText does.
  --xla_gpu_reduce_scatter_combine_threshold_bytes="$((_rsllm_threshold / (_rsllm_shards * 2)))"
  # With scanned layers (config.llm.scan_layers) start layer i+1's all-gather during layer i.
  --xla_gpu_enable_pipelined_all_gather=true
  # Likewise overlap layer i's gradient reduce-scatter with the backward pass of layer i-1.
  --xla_gpu_enable_pipelined_reduce_scatter=true
  # Likewise for the all-reduces inside the scanned layer loop.
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll the layer scan by two so the pipelined collectives have a next iteration to overlap with.
  --xla_gpu_enable_while_loop_double_buffering=true
)
XLA_FLAGS="${_rsllm_flags[*]}${XLA_FLAGS:+ ${XLA_FLAGS}}"
export XLA_FLAGS
# JAX preallocates this share of each GPU's memory; 0.9 leaves room for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
unset _rsllm_nodes _rsllm_gpus _rsllm_threshold _rsllm_shards _rsllm_flags
