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

    # ---- the LLM (stages 1, 2, eval) ----
    c.llm = ml_collections.ConfigDict()
    c.llm.model = "smollm2"  # 'smollm2' | path to a .gguf | a Hugging Face checkpoint directory
    c.llm.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    c.llm.param_dtype = "float32"  # storage dtype of the frozen base weights
    # none | full | dots | dots_no_batch. dots_no_batch keeps the projections' outputs and recomputes
    # attention probabilities and elementwise ops in the backward: storing them for 30 layers costs
    # more memory traffic than recomputing (SmolLM2 stage-2 step on 2 CPU cores: 6.9 -> 5.9 s,
    # `python -m benchmarks.run --only=train --remat_policy=...`).
    c.llm.remat_policy = "dots_no_batch"
    c.llm.scan_layers = True  # one layer body to compile (30 unrolled layers take minutes to compile on CPU)

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # Parameters that get gradients, as full-match regexes over '/'-joined param paths.
    c.trainable = (r"llm/.*lora_(a|b)", r"projector/.*", r"user_projector/.*", r"added_embeddings/.*")

    c.prompts = ml_collections.ConfigDict()
    c.prompts.use_ids = True  # Text-ID rendering "<title> [IID]"; False = text-only
    c.prompts.use_marker = False  # a marker token before each ID slot (ours)
    c.prompts.use_titles = True  # False: history and candidates as ID slots only (ablation; needs use_ids)
    # Wrap each prompt as a user turn of the tokenizer's chat template: on | off | auto (on when the
    # tokenizer has one; SmolLM2-Instruct answers bare completion prompts with EOS).
    c.prompts.chat_template = "auto"
    c.prompts.eval_template = 0  # the fixed template at evaluation
    # Padded prompt lengths, 32 tokens apart where LLaRA-sized prompts fall (rsllm_jax.data.prompts.FINE_BUCKETS):
    # MovieLens batches pad 18 % instead of 35 % with (256, 384, ...), 1.39x the windows/s (docs/benchmarks.md).
    c.prompts.buckets = (128, 160, 192, 224, 256, 288, 320, 352, 384, 448, 512, 640, 768, 1024)
    c.prompts.target_len = 24  # the target alone: a title + slot (longer titles are cut)
    # User slot (ours, CoLLM / A-LLMRec-style collaborative user token): "..., profile [UID]" after the
    # history, where a second projector writes SASRec's state after the history (the vector SASRec scores
    # items with). The LLM then compares one user vector with the candidates' ID slots.
    c.prompts.user_slot = False
    # Order the candidates are shown in: "given" (sampled / the split's frozen order) or "sasrec" (best
    # first by SASRec's logit: SASRec retrieves-and-ranks, the LLM re-ranks the ranked list; stage 2 only).
    c.prompts.candidate_order = "given"
    # With candidate_order="sasrec": K >= 2 orders each training window by a SASRec trained without its
    # user (K user folds, train/crossfit.py), so training shows SASRec's test-time accuracy, not its
    # training accuracy. 0 = the full model orders every window.
    c.prompts.crossfit_folds = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.weight_tt = 0.1  # a: L_TT = InfoNCE(v_T|U -> v_T)
    c.loss.weight_ut = 0.1  # b: L_UT = InfoNCE(v_U -> v_T)
    c.loss.temperature = 0.05
    c.loss.align_weight = 0.0  # optional ID-text alignment InfoNCE (ours)
    # Listwise distillation from SASRec (ours, DELRec / knowledge-distillation style): KL from SASRec's
    # softmax over the window's candidates (logits / distill_temperature) to the LM's distribution over
    # the candidates' first answer tokens, added with this weight. Twenty graded labels per window.
    c.loss.weight_distill = 0.0
    c.loss.distill_temperature = 1.0
    # Listwise candidate loss (ours): the answers of N candidates are packed after the target's in the
    # training row (segments that see only the prompt: data.prompts.pack_answers), each scored by its mean
    # answer-token log-likelihood (the evaluation's likelihood readout), and a softmax over target + N
    # negatives is trained towards the target, added with this weight. The negatives are the first N
    # non-target candidates in the order shown (SASRec's hardest with candidate_order="sasrec"); answers
    # are scored on their first listwise_answer_tokens tokens. One window then teaches a ranking of
    # 1 + N answers instead of ~5 answer tokens; it costs N short answers' tokens per row.
    c.loss.weight_listwise = 0.0
    c.loss.listwise_negatives = 9
    c.loss.listwise_answer_tokens = 16
    c.loss.listwise_temperature = 1.0
    # Whose rows are the InfoNCE negatives. "micro_batch": the other rows of one micro-batch (the spec's
    # in-batch form; with gradient accumulation the pool is batch_size / grad_accum_steps). "step" (ours):
    # every row of the step's batch, through a GradCache pass (one extra forward, same memory), so the
    # gradient equals an un-accumulated batch's.
    c.loss.nce_pool = "micro_batch"
    # LM-head logits only at the first N answer (loss) positions per row, 0 = at every position. Titles
    # are short, so 64 loses nothing (metrics report answer_tokens_dropped) and skips ~90 % of the
    # vocabulary matmul, the step's largest.
    c.loss.logit_positions = 64

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 8e-4  # LLaRA: 8e-4 MovieLens, 5e-4 Steam, 7e-4 LastFM
    c.optim.warmup_fraction = 0.05
    c.optim.min_lr_ratio = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-5
    c.optim.weight_decay_regex = r"projector/.*"
    c.optim.max_grad_norm = 1.0
    # "global": one norm over all trainable parameters (spec, LLaRA). "group": each top-level
    # group (llm LoRA, projector, added token rows) is clipped to max_grad_norm on its own.
    c.optim.clip_scope = "global"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # effective (global) batch per optimizer step
    c.train.grad_accum_steps = 32  # micro-batch = batch_size / grad_accum_steps
    c.train.num_epochs = 1.0
    c.train.max_train_samples = 0  # 0 = all; else a seeded subsample (CPU-sized runs)
    c.train.curriculum = False  # LLaRA's curriculum: unified prompt with probability step/total
    c.train.eval_every_steps = 0  # >0: validate every N steps, keep the best; 0: the last step is evaluated
    c.train.checkpoint_every_steps = 50
    c.train.keep_checkpoints = 2
    c.train.stop_after_steps = 0  # >0: save and exit after this step (simulates preemption; resume tests)
    # A run directory whose latest checkpoint (state, data position, log window) starts this run when its own
    # workdir has none: fork a run (e.g. train past its budget, or with other eval settings) into a new dir.
    c.train.resume_from = ""
    c.train.val_samples = 0  # 0 = all validation rows when picking the best checkpoint

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.datasets = ("movielens", "lastfm", "steam")  # union of their train splits (cross-domain)

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.sasrec_dir = ""  # stage-0 run dir with item_embeddings.npy; "" -> <workdir>/../sasrec-<dataset>
    c.stage2.stage1_dir = ""  # stage-1 run dir; "" -> <workdir>/../stage1; "none" = start from the base LLM
    c.stage2.build_missing = True  # train stage 0 / stage 1 first when their outputs are missing
    c.stage2.stage1_train_samples = 0  # stage-1 subsample when it is built on the fly (0 = stage1's own setting)

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 64
    c.eval.two_tower = True
    c.eval.generate = True  # LLaRA's generation protocol (ValidRatio, HitRatio@1)
    # Rank the candidates by the LM's likelihood of each as the answer (one prefill + 20 short passes per
    # prompt): a readout that cannot be invalid, to tell preference apart from answer format.
    c.eval.score_candidates = False
    c.eval.max_answer_tokens = 64  # likelihood readout: longer answers are scored on this prefix
    # Grounded answers (BIGRec-style): also decode within the 20 candidates' answers (a prefix trie), so every
    # answer names a candidate; reported as grounded_hr1 beside free generation, whose ValidRatio stays the
    # format metric.
    c.eval.grounded = False
    # 0 = every row of the split; >0 = a seeded random subset of N rows (data.splits.eval_subset), the same
    # rows for every model and stage 0 (CPU budgets on Steam's 1,194 test rows; smoke runs).
    c.eval.max_rows = 0

    # ---- run ----
    c.log_every_steps = 50
    # NaN/Inf guard (every trainer): a non-finite step is skipped and logged; this many in a row stop the run.
    c.max_nonfinite_steps = 5
    add_mesh(c)
    return c


def add_mesh(c):
    """Mesh axis sizes (-1 = all remaining devices) and logical-axis rules; see rsllm_jax/sharding.py."""
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical -> mesh axis rules (MaxText-style): the batch is split over every data-parallel axis;
    # weights are sharded over fsdp along embed and over tensor along heads/mlp/vocab.
    c.mesh.rules = [
        ["batch", ["data", "fsdp"]], ["length", None], ["embed", "fsdp"], ["vocab", "tensor"],
        ["heads", "tensor"], ["kv_heads", "tensor"], ["head_dim", None], ["mlp", "tensor"],
        ["layers", None], ["lora_rank", None], ["items", None],
    ]
    return c
