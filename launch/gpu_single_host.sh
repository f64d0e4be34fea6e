#!/usr/bin/env bash
# One GPU host (1-8 GPUs, tuned for H100/H200), one process driving every local GPU: bf16 weights and
# compute, FSDP over all GPUs, and the XLA flag set of launch/gpu_xla_flags.sh.
#
#   RSLLM_DATA_DIR=/data CONFIG=configs/stage2.py WORKDIR=runs/stage2-movielens \
#     bash launch/gpu_single_host.sh --config.llm.model=/models/Llama-2-7b-hf [more --config.* flags]
#
# Environment (all optional):
#   CONFIG         config file                          (default configs/stage2.py)
#   WORKDIR        run directory; re-running resumes from its checkpoints (default: main's runs/<stage>-<dataset>)
#   MESH_FLAGS     mesh overrides; set to "" for the config's own mesh
#                  (default "--config.mesh.fsdp=-1 --config.mesh.data=1")
#   GPUS_PER_NODE  GPUs used for the collective thresholds (default: nvidia-smi -L count, else 8)
#   PYTHON         interpreter                          (default python)
#   XLA_FLAGS      extra XLA flags, appended after (so overriding) the defaults
# Arguments are passed to rsllm_jax.main after the defaults, so they override them.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/stage2.py}
MESH_FLAGS=${MESH_FLAGS---config.mesh.fsdp=-1 --config.mesh.data=1}
if [[ -z ${GPUS_PER_NODE:-} ]] && command -v nvidia-smi >/dev/null 2>&1; then
  GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU' || true)
fi
if [[ -z ${GPUS_PER_NODE:-} || ${GPUS_PER_NODE} == 0 ]]; then
  GPUS_PER_NODE=8
fi
export NUM_NODES=1 GPUS_PER_NODE

# shellcheck source-path=SCRIPTDIR/.. source=launch/gpu_xla_flags.sh
source launch/gpu_xla_flags.sh

read -r -a mesh_flags <<<"${MESH_FLAGS}"
workdir_flag=()
if [[ -n ${WORKDIR:-} ]]; then
  workdir_flag=(--workdir="${WORKDIR}")
fi

echo "XLA_FLAGS=${XLA_FLAGS}" >&2
exec "${PYTHON:-python}" -m rsllm_jax.main --config="${CONFIG}" "${workdir_flag[@]}" \
  --config.llm.dtype=bfloat16 --config.llm.param_dtype=bfloat16 "${mesh_flags[@]}" "$@"
