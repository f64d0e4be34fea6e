#!/bin/bash
# The default recipe (configs/stage2.py) at a small budget, once on the rebuilt split (no data dir) and once
# on LLaRA's released rows; the two results.json and metrics.jsonl must be equal.
cd /work/main
B="--config.sasrec.epochs=2 --config.train.max_train_samples=32 --config.stage2.stage1_train_samples=32 --config.train.batch_size=8 --config.train.grad_accum_steps=2 --config.train.val_samples=8 --config.eval.max_rows=16"
for which in rebuilt released; do
  if [ $which = released ]; then export RSLLM_DATA_DIR=/work/shared/data; else unset RSLLM_DATA_DIR; fi
  nice -n 5 .venv/bin/python -m rsllm_jax.main --config=configs/stage2.py --workdir=runs/fallback_pair/$which/stage2 \
    --config.stage2.sasrec_dir=runs/fallback_pair/$which/sasrec-movielens --config.stage2.stage1_dir=runs/fallback_pair/$which/stage1 $B
done
