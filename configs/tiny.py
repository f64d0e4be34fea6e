"""A seconds-sized config for tests: tiny models, few steps."""
from configs import base


def get_config(stage: str | None = None):
    """`--config=configs/tiny.py` is stage 0; `--config=configs/tiny.py:stage2` (or stage1 / eval) the LLM stages."""
    if stage:
        return get_llm_config(stage)
    c = base.get_config()
    c.sasrec.batch_size = 32
    c.sasrec.epochs = 2
    c.sasrec.eval_every_epochs = 1
    c.sasrec.checkpoint_every_epochs = 1
    c.log_every_steps = 5
    return c


def get_llm_config(stage: str = "stage2"):
    """Stages 1/2/eval in seconds: used with a random tiny LLaMA and an in-process tokenizer."""
    c = get_config(None)
    c.stage = stage
    c.prompts.use_ids = stage != "stage1"
    c.prompts.buckets = (384, 512, 640)
    c.prompts.target_len = 16
    c.train.batch_size = 16
    c.train.grad_accum_steps = 2
    c.train.max_train_samples = 64
    c.train.checkpoint_every_steps = 2
    c.train.val_samples = 8
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 8
    c.lora.dropout = 0.0
    c.lora.rank = 8
    c.optim.lr = 3e-3
    c.stage1.datasets = ("custom",)
    c.stage2.build_missing = False
    if stage == "eval":
        c.checkpoint = ""
        c.checkpoint_stage = "stage2"
    return c


def get_p2rec_config(stage: str = "p2rec_reconstruct"):
    """The P2Rec stages in seconds: a tiny SASRec, a random tiny LLaMA, few users and steps."""
    from configs import p2rec_common

    c = p2rec_common.get_config(stage)
    t = get_config(None)
    c.sasrec, c.log_every_steps = t.sasrec, t.log_every_steps
    c.sasrec.hidden = 16  # PCA needs sasrec.hidden <= the tiny LLM's width (32)
    c.sasrec.epochs = 1
    c.p2rec.num_categories = 4
    c.p2rec.kmeans_iters = 20
    c.p2rec.build_missing = False
    c.train.batch_size = 16
    c.train.grad_accum_steps = 2
    c.train.checkpoint_every_steps = 100  # the final and the best step only
    c.lora.dropout = 0.0
    c.optim.lr = 3e-3
    return c
