"""The `config.p2rec` block shared by the two P2Rec stages (configs/p2rec_reconstruct.py, p2rec_augment.py).

Every choice that is ours (the abstract leaves the details open) is a field here.
"""
import ml_collections

from configs import base


def add_p2rec(c):
    p = c.p2rec = ml_collections.ConfigDict()
    p.sasrec_dir = ""  # pretrained SASRec (stage-0 run dir); "" -> <workdir>/../sasrec-<dataset>
    # reconstruction run dir (augment reads its LoRA); "" -> <workdir>/../p2rec_reconstruct-<dataset>;
    # "none" -> embed items with the pretrained LLM (ablation: augmentation without reconstruction)
    p.reconstruct_dir = ""
    p.build_missing = True  # train SASRec / run the reconstruction first when their checkpoints are missing
    # ---- information reconstruction ----
    p.num_categories = 32  # K latent categories: k-means over SASRec's item table
    p.kmeans_iters = 100
    p.kmeans_seed = 0
    # SASRec's next-item softmax temperature before summing per category; 0 = calibrated: the T that best
    # predicts the category of each training user's observed next item. BCE logits have no softmax scale:
    # at T = 1 the MovieLens/LastFM priors were near one-hot (entropy 0.04 nats) and predicted the next
    # item's category worse than uniform (NLL 4.08/6.76 vs log 32 = 3.47); calibrated T = 3.16 gives 1.30/2.39
    # (results/p2rec/<dataset>/calibration.md, from `python -m rsllm_jax.p2rec.calibrate`)
    p.prior_temperature = 0.0
    p.user_sequence = "full"  # full: last training window's history + target | history: the history only
    p.max_users = 0  # 0 = every training user; else a seeded subsample (CPU-sized runs)
    p.user_prompt = "A user's recent items, oldest first: {history}.\nThe user's taste in one phrase:"
    p.item_prompt = "Item: {title}.\nThis item in one phrase:"
    p.max_title_tokens = 24  # longer titles are cut
    p.pool = "mean"  # mean (every prompt token) | titles (title tokens only) | last (the final token)
    p.embed_batch_size = 16  # LLM forward batch for validation and item embeddings
    # ---- information augmentation ----
    p.reduce = "pca"  # pca (numpy SVD to sasrec.hidden) | learned (a trainable Dense inside SASRec)
    p.mode = "init"  # init (item rows start at the LLM rows) | add (a frozen LLM table is added to the rows)
    p.embed_scale = 0.0  # entry std of the reduced table; 0 = SASRec's init std (hidden ** -0.5)
    p.base = "sasrec_dir"  # the SASRec compared against: sasrec_dir (the stage-0 run) | retrain (same config, here)
    p.cold_threshold = 5  # cold item: fewer training interactions (distinct train users) than this
    return c


def get_config(stage: str):
    c = base.get_config()
    c.stage = stage
    add_p2rec(c)
    # The reconstruction model: the LLM (+ LoRA) reads text only; the head is ours.
    c.trainable = (r"llm/.*lora_(a|b)", r"p2rec_head/.*")
    c.optim.lr = 1e-3
    c.optim.weight_decay_regex = r"p2rec_head/.*"
    # CPU-sized defaults (SmolLM2-135M, ~130 tokens per user prompt); raise on accelerators.
    c.train.batch_size = 32
    c.train.grad_accum_steps = 8
    c.train.num_epochs = 1.0
    c.train.checkpoint_every_steps = 5
    if stage == "p2rec_reconstruct":  # ~25 optimizer steps: log each; augment's SASRec keeps the base cadence
        c.log_every_steps = 1
    return c
