"""Evaluate a checkpoint (or, with no checkpoint, the untrained model) on LLaRA's test rows.

python -m rsllm_jax.main --config=configs/eval.py --config.checkpoint=runs/stage2 --config.data.dataset=movielens
"""
from configs import base


def get_config():
    c = base.get_config()
    c.stage = "eval"
    c.checkpoint = ""  # a stage-1/2 run dir ("" = untrained: zero LoRA, fresh projector)
    c.checkpoint_stage = "stage2"  # stage2 (unified prompts) | stage1 (text-only)
    c.prompts.use_ids = True
    return c

