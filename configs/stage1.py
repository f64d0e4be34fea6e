"""Stage 1: text-only fine-tuning (LoRA) on the union of the configured datasets' train splits.

python -m rsllm_jax.main --config=configs/stage1.py --workdir=runs/stage1
Scale up: --config.train.max_train_samples=0 (every window), --config.llm.model=/path/to/Llama-2-7b-hf,
--config.llm.dtype=bfloat16 --config.llm.param_dtype=bfloat16 on accelerators.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.stage = "stage1"
    c.prompts.use_ids = False
    c.trainable = (r"llm/.*lora_(a|b)",)  # no ID slots in text-only prompts: only LoRA learns
    c.optim.lr = 5e-4
    # CPU-sized default (SmolLM2-135M at ~100 training tokens/s on 2 cores): a seeded subsample.
    c.train.max_train_samples = 192
    c.train.batch_size = 32
    c.train.grad_accum_steps = 8
    c.train.checkpoint_every_steps = 2
    c.train.val_samples = 48
    c.log_every_steps = 1  # a CPU step takes minutes: show every one
    c.eval.two_tower = False
    return c
