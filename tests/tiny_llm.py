"""A random tiny LLaMA matched to tests' in-process tokenizer (no weights downloaded)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rsllm_jax.models.llama import Llama, LlamaConfig
from tiny_tokenizer import tiny_tokenizer


def tiny_llm(seed: int = 0, **overrides):
    tok = tiny_tokenizer()
    kw = dict(vocab_size=len(tok) + 20, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    kw.update(overrides)
    config = LlamaConfig(**kw)
    params = nn.meta.unbox(Llama(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    return config, params, tok


def save_tiny_llm(model_dir, seed: int = 0):
    """The tiny LLaMA and its tokenizer written as a Hugging Face checkpoint directory, so that
    `--config.llm.model=<model_dir>` runs the real entry point on it. Returns model_dir."""
    from rsllm_jax.checkpoint.hf import save_hf

    config, params, tok = tiny_llm(seed)
    save_hf(params, config, model_dir)
    tok.save_pretrained(model_dir)
    return model_dir
