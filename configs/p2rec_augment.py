"""P2Rec information augmentation + evaluation: item embeddings from the reconstruction-tuned LLM
(cached), reduced to SASRec's width, initialise or are added to a new SASRec's item table; SASRec vs
SASRec + P2Rec on val/test, overall and on cold items (results.json, comparison.md).

python -m rsllm_jax.main --config=configs/p2rec_augment.py --config.data.dataset=movielens
    [--config.p2rec.reduce=pca|learned] [--config.p2rec.mode=init|add] [--config.p2rec.base=retrain]
Default workdir: runs/p2rec_augment-<dataset>; reads runs/p2rec_reconstruct-<dataset> and runs/sasrec-<dataset>.
The SASRec settings (config.sasrec.*) should match the stage-0 run's, or use base=retrain.
"""
from configs import p2rec_common


def get_config():
    return p2rec_common.get_config("p2rec_augment")
