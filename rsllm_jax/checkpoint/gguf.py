"""GGUF (llama.cpp) LLaMA files -> (LlamaConfig, params).

Tensors are dequantized to fp32 with `gguf.quants.dequantize`, renamed to their HF names with gguf's own
tensor-name map, and then go through the same table as HF checkpoints (`hf.build_params`). llama.cpp's
converter permutes q/k rows for interleaved RoPE; we use rotate-half RoPE, so `unpermute_qk` undoes it.
"""
from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from rsllm_jax.checkpoint.file_checks import WeightFileError, open_gguf
from rsllm_jax.checkpoint.hf import Params, Shardings, build_params
from rsllm_jax.models.llama import LlamaConfig

ARCH = "llama"


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF q/k row permutation (rotate-half pairs -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF q/k rows back to HF's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key.format(arch=ARCH))
    return default if field is None else field.contents()


def dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as fp32 in numpy (row-major, i.e. HF [out, in]) order."""
    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise WeightFileError(f"tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the gguf "
                              "package cannot dequantize in numpy: "
                              "re-export the model as F32/F16/BF16/Q8_0 (llama.cpp's convert_hf_to_gguf.py "
                              "--outtype)") from None
    return np.asarray(arr, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def gguf_config(reader: gguf.GGUFReader, **overrides: Any) -> LlamaConfig:
    """LlamaConfig from the `llama.*` metadata (and tensor presence, for tying / llama3 RoPE factors)."""
    K = gguf.Keys
    arch = _field(reader, K.General.ARCHITECTURE)
    if arch != ARCH:
        raise ValueError(f"GGUF architecture {arch!r}: only {ARCH!r} is supported")
    names = {t.name: t for t in reader.tensors}
    hidden = int(_field(reader, K.LLM.EMBEDDING_LENGTH))
    heads = int(_field(reader, K.Attention.HEAD_COUNT))
    vocab = _field(reader, K.LLM.VOCAB_SIZE) or len(reader.get_field(K.Tokenizer.LIST).data)
    scaling = _field(reader, K.Rope.SCALING_TYPE, "none")
    freq_factors = None
    if "rope_freqs.weight" in names:
        # llama3-style scaling is stored as per-frequency divisors rather than metadata.
        freq_factors = tuple(float(x) for x in dequantized(names["rope_freqs.weight"]).reshape(-1))
    kwargs: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, K.LLM.FEED_FORWARD_LENGTH)),
        num_layers=int(_field(reader, K.LLM.BLOCK_COUNT)),
        num_heads=heads,
        num_kv_heads=int(_field(reader, K.Attention.HEAD_COUNT_KV, heads)),
        head_dim=int(_field(reader, K.Attention.KEY_LENGTH, hidden // heads)),
        rms_norm_eps=float(_field(reader, K.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        max_position_embeddings=int(_field(reader, K.LLM.CONTEXT_LENGTH, 2048)),
        tie_word_embeddings="output.weight" not in names,
        rope_theta=float(_field(reader, K.Rope.FREQ_BASE, 10000.0)),
        rope_freq_factors=freq_factors,
        bos_token_id=_field(reader, K.Tokenizer.BOS_ID),
        eos_token_id=_field(reader, K.Tokenizer.EOS_ID),
    )
    if scaling == "linear":
        kwargs.update(rope_type="linear", rope_factor=float(_field(reader, K.Rope.SCALING_FACTOR, 1.0)))
    elif scaling not in ("none", None):
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def load_gguf(
    path: str | os.PathLike, *, param_dtype: Any = np.float32, shardings: Shardings = None, **config_overrides: Any
) -> tuple[LlamaConfig, Params]:
    """GGUF file -> (LlamaConfig, params); tensors are dequantized and placed one at a time."""
    reader = open_gguf(path)
    try:
        config = gguf_config(reader, **config_overrides)
    except ValueError as e:
        raise WeightFileError(f"{path}: {e}") from None
    except TypeError:  # int(None): a required llama.* key is absent
        raise WeightFileError(f"{path}: incomplete llama metadata (llama.embedding_length, block_count, "
                              "attention.head_count, ... are required)") from None
    tensors = {t.name: t for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)

    def read(hf_name: str) -> np.ndarray:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name not in tensors:
            raise KeyError(f"{hf_name} ({gguf_name}) not in {path}")
        try:
            w = dequantized(tensors[gguf_name])
        except WeightFileError as e:
            raise WeightFileError(f"{path}: {e}") from None
        if gguf_name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        return w

    return config, build_params(config, read, param_dtype=param_dtype, shardings=shardings)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer embedded in the GGUF, built offline by transformers' own GGUF tokenizer converter.

    The metadata is read with the gguf package, not through `AutoTokenizer(gguf_file=...)`: from
    transformers 5.20 on, its GGUF reader imports torch, which a JAX install does not have
    (`pip install -e .` then failed in `load_llm` with "Could not import module 'read_gguf_metadata'").
    tests/test_gguf.py checks that both routes give the same tokenizer on the real SmolLM2 file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = open_gguf(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: no tokenizer in this GGUF (no tokenizer.ggml.tokens); pass a Hugging Face "
                         "checkpoint directory with tokenizer files instead")
    # transformers' renames of the tokenizer.* keys, grouped into the converter's input and the
    # tokenizer's config (chat template, add_bos/eos flags), as its own GGUF path does.
    groups = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in metadata}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, gguf.Keys.General.ARCHITECTURE), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(path), **tokenizer_config, **extra)
