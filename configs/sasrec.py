"""Stage 0: train SASRec on the target dataset and export its item-embedding table.

python -m rsllm_jax.main --config=configs/sasrec.py --config.data.dataset=movielens --workdir=runs/sasrec_ml
"""
from configs import base


def get_config():
    c = base.get_config()
    c.stage = "sasrec"
    return c
