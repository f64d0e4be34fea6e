"""Hugging Face LLaMA checkpoints <-> our parameter tree, driven by one key-mapping table.

Loading streams tensor by tensor from safetensors (`safe_open`, no torch) and can place each tensor
straight into its target sharding, so the host never holds more than one (stacked) tensor beyond what
is already on device. HF q/k are stored for rotate-half RoPE, which is what we use: no permutation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from rsllm_jax.checkpoint.file_checks import WeightFileError, check_safetensors
from safetensors.numpy import save_file

from rsllm_jax.models.llama import LlamaConfig, unstack_layers

Params = dict[str, Any]
# A sharding pytree matching the params, or a function (path, shape) -> sharding, or None (default device).
Shardings = Union[Params, Callable[[str, tuple[int, ...]], Any], None]
Reader = Callable[[str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change HF -> ours and its inverse (`c` is the model config)."""

    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]


IDENTITY = Transform(lambda w, c: w, lambda w, c: w)
# torch Linear weights are [out, in]; our kernels are [in, out].
LINEAR = Transform(lambda w, c: w.T, lambda w, c: w.T)
Q_IN = Transform(
    lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, -1).T,
)
KV_IN = Transform(
    lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
    lambda w, c: w.reshape(c.hidden_size, -1).T,
)
O_OUT = Transform(
    lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    lambda w, c: w.reshape(-1, c.hidden_size).T,
)

# (HF name, our '/'-joined path, transform); `{i}` is the layer index.
GLOBAL_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", IDENTITY),
    ("model.norm.weight", "norm/scale", IDENTITY),
    ("lm_head.weight", "lm_head/kernel", LINEAR),
)
LAYER_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("model.layers.{i}.input_layernorm.weight", "input_layernorm/scale", IDENTITY),
    ("model.layers.{i}.post_attention_layernorm.weight", "post_attention_layernorm/scale", IDENTITY),
    ("model.layers.{i}.self_attn.q_proj.weight", "self_attn/q_proj/kernel", Q_IN),
    ("model.layers.{i}.self_attn.k_proj.weight", "self_attn/k_proj/kernel", KV_IN),
    ("model.layers.{i}.self_attn.v_proj.weight", "self_attn/v_proj/kernel", KV_IN),
    ("model.layers.{i}.self_attn.o_proj.weight", "self_attn/o_proj/kernel", O_OUT),
    ("model.layers.{i}.mlp.gate_proj.weight", "mlp/gate_proj/kernel", LINEAR),
    ("model.layers.{i}.mlp.up_proj.weight", "mlp/up_proj/kernel", LINEAR),
    ("model.layers.{i}.mlp.down_proj.weight", "mlp/down_proj/kernel", LINEAR),
)


def _global_rules(config: LlamaConfig) -> list[tuple[str, str, Transform]]:
    return [r for r in GLOBAL_TABLE if not (config.tie_word_embeddings and r[1].startswith("lm_head/"))]


def _place(arr: np.ndarray, path: str, param_dtype: Any, shardings: Shardings) -> jax.Array:
    arr = np.asarray(arr).astype(param_dtype)
    if shardings is None:
        return jax.device_put(arr)
    sharding = shardings(path, arr.shape) if callable(shardings) else _lookup(shardings, path)
    return jax.device_put(arr, sharding)


def _lookup(tree: Params, path: str) -> Any:
    node: Any = tree
    for key in path.split("/"):
        node = node[key]
    return node


def build_params(
    config: LlamaConfig, read: Reader, *, param_dtype: Any = np.float32, shardings: Shardings = None
) -> Params:
    """Assembles our parameter tree from `read(hf_name) -> np.ndarray` following the table.

    With `config.scan_layers` the per-layer tensors of one table row are stacked on the host and placed
    once, so peak host memory is one stacked tensor.
    """
    flat: dict[str, jax.Array] = {}
    for hf_name, path, tr in _global_rules(config):
        flat[path] = _place(tr.to_ours(read(hf_name), config), path, param_dtype, shardings)
    for hf_tmpl, sub, tr in LAYER_TABLE:
        if config.scan_layers:
            path = f"layers/{sub}"
            stacked = np.stack([tr.to_ours(read(hf_tmpl.format(i=i)), config) for i in range(config.num_layers)])
            flat[path] = _place(stacked, path, param_dtype, shardings)
        else:
            for i in range(config.num_layers):
                path = f"layers_{i}/{sub}"
                flat[path] = _place(tr.to_ours(read(hf_tmpl.format(i=i)), config), path, param_dtype, shardings)
    return traverse_util.unflatten_dict(flat, sep="/")


def to_hf_tensors(params: Params, config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The reverse mapping: yields (HF name, numpy tensor) for every table row."""
    if "layers" in params:
        params = unstack_layers(params)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    extra = [p for p in flat if "lora_" in p]
    if extra:
        raise ValueError(f"un-merged LoRA leaves present ({extra[0]}, ...): call merge_lora first")
    for hf_name, path, tr in _global_rules(config):
        yield hf_name, tr.to_hf(np.asarray(jax.device_get(flat[path])), config)
    for i in range(config.num_layers):
        for hf_tmpl, sub, tr in LAYER_TABLE:
            yield hf_tmpl.format(i=i), tr.to_hf(np.asarray(jax.device_get(flat[f"layers_{i}/{sub}"])), config)


@contextlib.contextmanager
def safetensors_reader(model_dir: str | os.PathLike) -> Iterator[Reader]:
    """A `read(name)` over model.safetensors or a sharded model.safetensors.index.json."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise WeightFileError(f"{index}: not a safetensors index (JSON with a 'weight_map'): {e!r}") from None
        for fname in sorted(set(weight_map.values())):
            if not (model_dir / fname).exists():
                raise FileNotFoundError(f"{index} maps tensors to {fname}, which is not in {model_dir}")
            check_safetensors(model_dir / fname)
    else:
        single = model_dir / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"no model.safetensors(.index.json) in {model_dir}")
        weight_map = {k: single.name for k in check_safetensors(single) if k != "__metadata__"}
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def read(name: str) -> np.ndarray:
            if name not in weight_map:
                raise KeyError(f"{name} not in checkpoint {model_dir}")
            fname = weight_map[name]
            try:
                if fname not in handles:
                    handles[fname] = stack.enter_context(safe_open(model_dir / fname, framework="numpy"))
                return handles[fname].get_tensor(name)
            except SafetensorError as e:
                raise WeightFileError(f"{model_dir / fname}: tensor {name!r} cannot be read ({e})") from None

        yield read


def load_hf_config(model_dir: str | os.PathLike, **overrides: Any) -> LlamaConfig:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type={cfg.get('model_type')!r}: only LLaMA-architecture checkpoints are supported")
    return LlamaConfig.from_hf_config(cfg, **overrides)


def load_hf(
    model_dir: str | os.PathLike,
    *,
    param_dtype: Any = np.float32,
    shardings: Shardings = None,
    **config_overrides: Any,
) -> tuple[LlamaConfig, Params]:
    """HF checkpoint directory -> (LlamaConfig, params). `config_overrides` e.g. scan_layers=True."""
    config = load_hf_config(model_dir, **config_overrides)
    with safetensors_reader(model_dir) as read:
        params = build_params(config, read, param_dtype=param_dtype, shardings=shardings)
    return config, params


def save_hf(params: Params, config: LlamaConfig, out_dir: str | os.PathLike, *, dtype: Any = None) -> Path:
    """Writes config.json + model.safetensors loadable by `LlamaForCausalLM.from_pretrained(out_dir)`.

    `params` must be LoRA-free (see `merge_lora`); `dtype` (e.g. np.float32) casts on write.
    """
    from transformers import LlamaConfig as HFLlamaConfig  # config schema only; no torch needed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.ascontiguousarray(t if dtype is None else t.astype(dtype)) for name, t in to_hf_tensors(params, config)
    }
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    hf_dtype = str(next(iter(tensors.values())).dtype)
    HFLlamaConfig(architectures=["LlamaForCausalLM"], dtype=hf_dtype, **config.to_hf_config()).save_pretrained(out_dir)
    return out_dir
