"""One entry point for the LLM: 'smollm2', a .gguf file, or a Hugging Face checkpoint directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from rsllm_jax.checkpoint import gguf as gguf_ckpt
from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.checkpoint.file_checks import check_tokenizer_fits
from rsllm_jax.checkpoint.smollm2 import ensure_smollm2
from rsllm_jax.models.llama import LlamaConfig


def resolve_spec(spec: str) -> Path:
    """'smollm2' -> the cached GGUF; otherwise the path itself (a .gguf file or an HF directory)."""
    if spec.lower() == "smollm2":
        return ensure_smollm2()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model spec {spec!r}: expected 'smollm2', a .gguf file or an HF checkpoint dir")
    return path


def load_llm(
    spec: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    shardings: hf_ckpt.Shardings = None,
    with_tokenizer: bool = True,
    **config_overrides: Any,
) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """(config, params, tokenizer). `dtype` is the compute dtype the caller will build `Llama` with;
    params are stored in `param_dtype`. `config_overrides` set execution options (scan_layers, remat_policy)."""
    del dtype  # the compute dtype belongs to the module; accepted here so call sites read uniformly
    path = resolve_spec(spec)
    if path.suffix == ".gguf":
        config, params = gguf_ckpt.load_gguf(path, param_dtype=param_dtype, shardings=shardings, **config_overrides)
        tokenizer = gguf_ckpt.load_gguf_tokenizer(path) if with_tokenizer else None
    else:
        config, params = hf_ckpt.load_hf(path, param_dtype=param_dtype, shardings=shardings, **config_overrides)
        tokenizer = None
        if with_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config.vocab_size, str(path))
    return config, params, tokenizer
