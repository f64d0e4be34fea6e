"""Shared defaults for every stage. Stage files start from `get_config()` here and override.

Every choice the spec marks "(ours)" is a field here, not a constant in code.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "sasrec"  # sasrec | stage1 | stage2 | eval
    c.seed = 0

    # ---- data (spec §1) ----
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "movielens"  # movielens | lastfm | steam | custom
    c.data.data_dir = ""  # root holding ml-100k/, hetrec2011-lastfm-2k/, steam/, llara_ref/; "" -> $RSLLM_DATA_DIR
    c.data.cache_dir = ""  # processed-split cache; "" -> ~/.cache/rsllm_jax/splits
    c.data.split_seed = 0  # user split + frozen val/test candidates
    c.data.num_candidates = 20
    c.data.max_history = 10
    c.data.min_history = 3
    # Bring-your-own data (dataset=custom): interactions CSV/TSV (user, item, timestamp) + items file (item, title).
    c.data.custom_interactions = ""
    c.data.custom_items = ""
    c.data.grain_workers = 0  # 0 = in-process; >0 = Grain multiprocessing workers

    # ---- SASRec (spec §2) ----
    c.sasrec = ml_collections.ConfigDict()
    c.sasrec.hidden = 64
    c.sasrec.num_blocks = 1
    c.sasrec.num_heads = 1
    c.sasrec.dropout = 0.1
    c.sasrec.loss = "bce"  # bce (one sampled negative, as LLaRA) | softmax (full cross-entropy, ours)
    c.sasrec.batch_size = 256
    c.sasrec.eval_batch_size = 256
    c.sasrec.lr = 1e-3
    c.sasrec.weight_decay = 0.0
    c.sasrec.epochs = 200
    c.sasrec.eval_every_epochs = 5
    c.sasrec.patience = 10  # evaluations without val HR@1 improvement before stopping
    c.sasrec.checkpoint_every_epochs = 5
    c.sasrec.keep_checkpoints = 2

    # ---- run ----
    c.log_every_steps = 50
    add_mesh(c)
    return c


def add_mesh(c):
    """Mesh axis sizes (-1 = all remaining devices) and logical-axis rules; see rsllm_jax/sharding.py."""
    from rsllm_jax import sharding

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])] for r in sharding.DEFAULT_RULES]
    return c
