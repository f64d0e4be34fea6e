#!/usr/bin/env bash
# Stage 0 (SASRec) on MovieLens, LastFM and Steam with both losses; the README table comes from
# runs/sasrec-<dataset>-<loss>/results.json. Usage: RSLLM_DATA_DIR=../shared/data bash launch/sasrec_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for loss in ${LOSSES:-bce softmax}; do
  for ds in ${DATASETS:-movielens lastfm steam}; do
    python -m rsllm_jax.main --config=configs/sasrec.py --config.data.dataset="$ds" \
      --config.sasrec.loss="$loss" --workdir="runs/sasrec-$ds-$loss" "$@"
  done
done
