"""Stage 2 at the paper's scale: Llama-2-7B + LoRA r=8, bf16, FSDP over every device, LLaRA's batch.

    python -m rsllm_jax.main --config=configs/llama2_7b.py --config.llm.model=/path/to/Llama-2-7b-hf \
        --config.stage2.stage1_dir=gs://.../stage1 --workdir=/shared/runs/stage2-movielens-7b

Memory per device for the layouts this config can use is measured ahead of time by
`python -m rsllm_jax.memory_plan --config=configs/llama2_7b.py` (docs/scaling.md).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.stage = "stage2"
    c.data.dataset = "movielens"
    c.llm.model = ""  # a Llama-2-7B HF directory (config.json + *.safetensors + tokenizer) or a .gguf
    c.llm.dtype = "bfloat16"
    c.llm.param_dtype = "bfloat16"  # frozen base in bf16; LoRA/projector leaves are bf16 too (Adam state f32)
    c.llm.scan_layers = True
    c.llm.remat_policy = "dots"  # keep matmul outputs, recompute the rest: activations of 32 layers fit
    c.prompts.chat_template = "off"  # the base (non-chat) Llama-2, as LLaRA
    c.optim.lr = 8e-4
    c.train.batch_size = 128  # LLaRA's effective batch
    c.train.grad_accum_steps = 4  # micro-batch 32 = 4 per device on 8 chips (see docs/scaling.md)
    c.train.num_epochs = 1.0
    c.train.checkpoint_every_steps = 50
    c.eval.batch_size = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
