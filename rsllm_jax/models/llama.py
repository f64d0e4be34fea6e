"""The LLaMA family in Flax Linen: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention.

One implementation serves SmolLM2-135M up to Llama-2/3 7B+. Conventions:
  * rotate-half RoPE, so Hugging Face q/k weights load unchanged (GGUF q/k are un-permuted on import);
  * `dtype` is the compute dtype, `param_dtype` the storage dtype; norms, softmax and logits are fp32;
  * every parameter carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp and
    'layers' for the scanned stack); mesh names live only in the sharding rules.

Parameter tree (per-layer form; with `scan_layers` the `layers_{i}` subtrees are stacked into one
`layers` subtree with a leading axis, see `stack_layers` / `unstack_layers`):
  embed_tokens/embedding [V, D]
  layers_{i}/input_layernorm/scale [D]
  layers_{i}/self_attn/{q,k,v}_proj/kernel [D, H|KV, Dh],  o_proj/kernel [H, Dh, D]
  layers_{i}/post_attention_layernorm/scale [D]
  layers_{i}/mlp/{gate,up}_proj/kernel [D, F],  down_proj/kernel [F, D]
  norm/scale [D]
  lm_head/kernel [D, V]   (absent when embeddings are tied)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.lora import LoraConfig, LoraDense

Cache = dict[str, jax.Array]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # RoPE: rope_type in ('default', 'linear', 'llama3'); the factor fields follow HF's rope_scaling.
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    # Per-frequency divisors as stored by llama.cpp (`rope_freqs.weight`); overrides rope_type.
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Execution options (not part of the checkpoint).
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None  # passed to jax.nn.dot_product_attention ('xla' | 'cudnn' | None)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides: Any) -> "LlamaConfig":
        """Builds the config from a Hugging Face `config.json` dict (transformers 4.x and 5.x layouts)."""
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("LLaMA checkpoints with attention/MLP biases are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        # transformers 5 folds rope_theta into `rope_parameters`; 4.x has rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        kwargs = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(
                rope.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
            ),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The `transformers.LlamaConfig` keyword arguments describing this model."""
        if self.rope_freq_factors is not None:
            raise ValueError("explicit rope_freq_factors have no Hugging Face config equivalent")
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position,
            )
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )

    def num_params(self) -> int:
        d, f, l_, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + l_ * per_layer + d


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim // 2] including linear / llama3 scaling (as in transformers)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        # Between the two wavelength thresholds, interpolate smoothly between scaled and unscaled.
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] in fp32 for rotate-half RoPE."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, head_dim] (fp32 math, result in x.dtype)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return xf * scale.astype(jnp.float32)


def _logits(hidden: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    # Matmul in the compute dtype, accumulated and returned in fp32.
    return jnp.einsum("btd,dv->btv", hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


class LmHead(nn.Module):
    vocab_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
            (hidden.shape[-1], self.vocab_size),
            self.param_dtype,
        )
        return _logits(hidden, kernel, self.dtype)


def _proj(
    parent: nn.Module, name: str, features: tuple[int, ...], axes: tuple[str, ...], n_in: int = 1
) -> LoraDense:
    """A projection of `parent`, LoRA-adapted when its name is among the LoRA targets."""
    lora = parent.lora if parent.lora is not None and name in parent.lora.targets else None
    return LoraDense(
        features, axes, n_in=n_in, lora=lora, dtype=parent.dtype, param_dtype=parent.param_dtype, name=name
    )


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    lora: LoraConfig | None
    deterministic: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index):
        c = self.config
        det = self.deterministic
        q = _proj(self, "q_proj", (c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))(x, det)
        k = _proj(self, "k_proj", (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x, det)
        v = _proj(self, "v_proj", (c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"))(x, det)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        new_kv = None
        if kv is not None:
            # Write this call's keys/values into the cache slots [index, index + T).
            k_cache, v_cache = kv
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            new_kv = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=c.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        o = _proj(self, "o_proj", (c.hidden_size,), ("heads", "head_dim", "embed"), n_in=2)(out, det)
        return o, new_kv


class Mlp(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    lora: LoraConfig | None
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        c, det = self.config, self.deterministic
        gate = _proj(self, "gate_proj", (c.intermediate_size,), ("embed", "mlp"))(x, det)
        up = _proj(self, "up_proj", (c.intermediate_size,), ("embed", "mlp"))(x, det)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _proj(self, "down_proj", (c.hidden_size,), ("mlp", "embed"))(h, det)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, kv, cos, sin, mask, index, deterministic: bool = True):
        c = self.config
        sub = dict(
            config=c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora, deterministic=deterministic
        )
        h = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="input_layernorm")(x)
        attn, new_kv = Attention(**sub, name="self_attn")(h.astype(self.dtype), cos, sin, mask, kv, index)
        x = nn.with_logical_constraint(x + attn.astype(x.dtype), ("batch", "length", "embed"))
        h = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype, name="post_attention_layernorm")(x)
        x = x + Mlp(**sub, name="mlp")(h.astype(self.dtype)).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, new_kv


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache: k/v [layers, B, max_len, kv_heads, head_dim], slot validity mask [B, max_len],
    the next write slot `index` (shared: prompts are left-padded) and each row's next RoPE position `pos`."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return dict(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
        pos=jnp.zeros((batch,), jnp.int32),
    )


class Llama(nn.Module):
    """LLaMA decoder. Returns logits [B, T, V] (fp32), plus `hidden` (final-norm output, fp32) when
    `return_hidden`, plus the updated cache when `cache` is given."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        self.norm = RMSNorm(c.rms_norm_eps, param_dtype=self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = LmHead(c.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype)
        self.layers = self._build_layers()

    def _build_layers(self):
        c = self.config
        block = DecoderLayer
        if c.remat_policy != "none":
            # `deterministic` (arg 7, counting self) is a Python bool; scan already blocks CSE.
            block = nn.remat(
                DecoderLayer, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers, static_argnums=(7,)
            )
        kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        if c.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 5,
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(**kw, name="layers")
        return [block(**kw, name=f"layers_{i}") for i in range(c.num_layers)]

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype."""
        return self.embed_tokens(input_ids)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, T, D] -> fp32 logits [B, T, V] (tied or untied LM head)."""
        if self.config.tie_word_embeddings:
            logits = _logits(hidden, self.embed_tokens.embedding.T, self.dtype)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        compute_logits: bool = True,
    ):
        """`compute_logits=False` (with return_hidden) skips the LM head: a caller that needs logits at
        a few positions only gathers them and calls `head` (the vocabulary matmul is the biggest one).
        `segment_ids` [B, T] packs several sequences into one row: a token sees only earlier tokens of
        its own segment and every slot of segment 0 (the cache's earlier slots are segment 0: a shared
        prompt that several packed continuations attend to)."""
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids / inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        start_pos = jnp.zeros((b,), jnp.int32) if cache is None else cache["pos"]
        if positions is None:
            positions = start_pos[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        cos, sin = rope_tables(c, positions)

        # Attention over key slots: causal in slot order, padding masked out. Every query also sees its
        # own slot so fully padded query rows stay finite (their outputs are never used).
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        kv_valid = mask if cache is None else jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
        q_slot = index + jnp.arange(t)[:, None]
        k_slot = jnp.arange(kv_valid.shape[1])[None, :]
        allowed = (k_slot <= q_slot)[None] & kv_valid[:, None, :]
        if segment_ids is not None:
            seg_q = segment_ids.astype(jnp.int32)
            seg_k = seg_q if cache is None else jax.lax.dynamic_update_slice(
                jnp.zeros(kv_valid.shape, jnp.int32), seg_q, (0, index))
            allowed &= (seg_k[:, None, :] == 0) | (seg_k[:, None, :] == seg_q[:, :, None])
        allowed |= (k_slot == q_slot)[None]
        attn_mask = allowed[:, None]  # [B, 1, T, S], broadcast over heads

        if c.scan_layers:
            kv = None if cache is None else (cache["k"], cache["v"])
            x, new_kv = self.layers(x, kv, cos, sin, attn_mask, index, deterministic)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache["k"][i], cache["v"][i])
                x, layer_kv = layer(x, kv, cos, sin, attn_mask, index, deterministic)
                outs.append(layer_kv)
            new_kv = None if cache is None else tuple(jnp.stack(z) for z in zip(*outs))

        hidden = nn.with_logical_constraint(self.norm(x), ("batch", "length", "embed"))
        out: tuple[Any, ...] = (self.head(hidden) if compute_logits else None,)
        if return_hidden:
            out += (hidden,)
        if cache is not None:
            new_cache = dict(
                k=new_kv[0], v=new_kv[1], mask=kv_valid, index=index + t,
                pos=start_pos + jnp.sum(mask, axis=1, dtype=jnp.int32),
            )
            out += (new_cache,)
        return out[0] if len(out) == 1 else out


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer tree (`layers_{i}`) -> scanned tree (`layers` with a leading axis)."""
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned tree (`layers`) -> per-layer tree (`layers_{i}`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out
