#!/usr/bin/env bash
# Stage 0 -> 1 -> 2 -> eval on one machine, each stage in its own run directory under $RUNS.
#   RSLLM_DATA_DIR=../shared/data bash launch/local.sh [movielens|lastfm|steam] [extra --config.* flags]
# A stage whose run directory already holds a finished run is resumed/skipped by its own checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:-movielens}
shift || true
RUNS=${RUNS:-runs}

python -m rsllm_jax.main --config=configs/sasrec.py --config.data.dataset="$DATASET" \
  --workdir="$RUNS/sasrec-$DATASET" "$@"
python -m rsllm_jax.main --config=configs/stage1.py --config.data.dataset="$DATASET" \
  --workdir="$RUNS/stage1" "$@"
python -m rsllm_jax.main --config=configs/stage2.py --config.data.dataset="$DATASET" \
  --config.stage2.sasrec_dir="$RUNS/sasrec-$DATASET" --config.stage2.stage1_dir="$RUNS/stage1" \
  --workdir="$RUNS/stage2-$DATASET" "$@"
python -m rsllm_jax.main --config=configs/eval.py --config.data.dataset="$DATASET" \
  --config.checkpoint="$RUNS/stage2-$DATASET" --workdir="$RUNS/eval-$DATASET" "$@"
python -m rsllm_jax.report.plot --workdir="$RUNS/stage2-$DATASET"
