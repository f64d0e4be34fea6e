"""P2Rec information reconstruction: LoRA + a Dense(K) head learn to read a user's SASRec category prior
from the titles of their sequence. Needs a stage-0 SASRec (built first if missing).

python -m rsllm_jax.main --config=configs/p2rec_reconstruct.py --config.data.dataset=movielens
    [--config.p2rec.sasrec_dir=runs/sasrec-movielens] [--config.p2rec.num_categories=32]
Default workdir: runs/p2rec_reconstruct-<dataset>.
"""
from configs import p2rec_common


def get_config():
    return p2rec_common.get_config("p2rec_reconstruct")
