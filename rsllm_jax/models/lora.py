"""LoRA: a LoRA-capable dense projection, merging, and trainable/frozen tree splits.

A LoRA projection keeps the base `kernel` and adds `lora_a` (in -> r) and `lora_b` (r -> out, zero
initialised, so a fresh adapter is the identity) under the same scope, e.g.
`layers_3/self_attn/q_proj/{kernel,lora_a,lora_b}`. Selecting adapters is then a regex over
'/'-joined paths (`.*/lora_(a|b)`), which is how the train step splits trainable from frozen.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Params = dict[str, Any]

LORA_REGEX = r".*/lora_(a|b)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _fan_init(scale: float, distribution: str, n_in: int, ndim: int) -> nn.initializers.Initializer:
    # Multi-axis kernels (e.g. [embed, heads, head_dim]) need explicit fan axes.
    return nn.initializers.variance_scaling(
        scale, "fan_in", distribution, in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, ndim))
    )


@jax.custom_vjp
def lora_path(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x . a) . b for 2-D x [N, in], a [in, r], b [r, out], with a hand-written backward.

    Why: autodiff writes the factor gradients as contractions over the token axis of the big
    [N, out] cotangent, and XLA:CPU's layout assignment then materialises that cotangent transposed
    (a strided copy per adapted projection: the `copy_bitcast_fusion`s that took ~23% of the train
    step). Here every transpose lands on a small [N, r] / [r, out] operand instead. Same math.
    """
    return (x @ a) @ b


def _lora_path_fwd(x, a, b):
    h = x @ a
    return h @ b, (x, h, a, b)


def _lora_path_bwd(res, g):
    x, h, a, b = res
    db = h.T @ g
    dh = g @ b.T
    return dh @ a.T, x.T @ dh, db


lora_path.defvjp(_lora_path_fwd, _lora_path_bwd)


@jax.custom_vjp
def mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, in] . w [in, out] in a low-precision dtype (bf16), accumulated in fp32, returned in x.dtype.

    Why: XLA:CPU sends a bf16 x bf16 dot to its fast (AMX / oneDNN) kernel only when the result is fp32
    (1,330 vs 227 GFLOP/s for bf16 out, 263 in fp32, SmolLM2's MLP shape on this 2-core CPU), and autodiff's
    transpose of a dot asks for the input's dtype. Here both backward dots ask for fp32 as well. The
    weight gradient (the token-axis contraction) is dead code, removed by XLA, when `w` is frozen.
    """
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _mixed_matmul_fwd(x, w):
    return mixed_matmul(x, w), (x, w)


def _mixed_matmul_bwd(res, g):
    x, w = res
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def lora_dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    """Inverted dropout on the adapter's input (what nn.Dropout does), with half the random bits.

    Why: every adapter input gets its own mask, and one threefry word per element made dropout 27 % of
    a CPU train step (SmolLM2-135M, 4 x 384 tokens: 12.0 s vs 8.8 s without dropout). Here each 32-bit
    word gives two 16-bit uniforms (10.9 s); the drop rate is rounded to a multiple of 2^-16
    (0.1 -> 0.100006) and kept values are scaled by the exact keep probability, so it stays unbiased.
    """
    if deterministic or rate == 0.0:
        return x
    if x.shape[-1] % 2:
        return nn.Dropout(rate)(x, deterministic=False)
    threshold = round(rate * 65536)
    words = jax.random.bits(module.make_rng("dropout"), x.shape[:-1] + (x.shape[-1] // 2,), jnp.uint32)
    uniforms = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(x.shape)
    keep_prob = 1.0 - threshold / 65536
    return jnp.where(uniforms >= threshold, x / keep_prob, jnp.zeros_like(x))


class LoraDense(nn.Module):
    """y = x . kernel (+ dropout(x) . lora_a . lora_b * alpha/r), contracting the last `n_in` axes of x.

    `kernel` has shape x.shape[-n_in:] + features and logical axes `kernel_axes`; the LoRA
    factors inherit the input / output axis names so they shard like the kernel they adapt; the rank
    axis is 'lora_rank' (replicated by the default rules).
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    n_in: int = 1
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in:]
        kshape = tuple(in_shape) + tuple(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_fan_init(1.0, "truncated_normal", self.n_in, len(kshape)), self.kernel_axes),
            kshape,
            self.param_dtype,
        )
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        x = x.astype(self.dtype)
        n_in, n_out = math.prod(in_shape), math.prod(self.features)
        if jnp.dtype(self.dtype) == jnp.float32:
            y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
        else:  # bf16 compute: fp32 accumulation on the fast path, forward and backward
            y = mixed_matmul(x.reshape(-1, n_in), kernel.astype(self.dtype).reshape(n_in, n_out))
            y = y.reshape(x.shape[: x.ndim - self.n_in] + tuple(self.features))
        if self.lora is None:
            return y
        r = self.lora.rank
        in_axes, out_axes = self.kernel_axes[: self.n_in], self.kernel_axes[self.n_in:]
        a = self.param(
            "lora_a",
            # Same distribution family as peft's kaiming_uniform(a=sqrt(5)) for lora_A.
            nn.with_logical_partitioning(
                _fan_init(1.0 / 3.0, "uniform", self.n_in, self.n_in + 1), in_axes + ("lora_rank",)
            ),
            tuple(in_shape) + (r,),
            self.param_dtype,
        )
        b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("lora_rank",) + out_axes),
            (r,) + tuple(self.features),
            self.param_dtype,
        )
        h = lora_dropout(self, x, self.lora.dropout, deterministic)
        h = lora_path(h.reshape(-1, n_in), a.astype(self.dtype).reshape(n_in, r), b.astype(self.dtype).reshape(r, n_out))
        h = h.reshape(y.shape)
        return y + (h * self.lora.scale).astype(y.dtype)


def merge_lora(params: Params, lora_config: LoraConfig) -> Params:
    """Folds every (lora_a, lora_b) pair into its sibling `kernel` and drops the LoRA leaves.

    Works for per-layer and scanned (leading 'layers' axis) trees. Pure: returns a new tree.
    """

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: visit(v) for k, v in node.items()}
        if "lora_a" not in node:
            return node
        a, b, kernel = node.pop("lora_a"), node.pop("lora_b"), node["kernel"]
        # A scanned tree shares one leading layer axis between a, b and kernel.
        stacked = a.ndim + b.ndim - 2 != kernel.ndim
        fold = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)  # noqa: E731
        delta = jax.vmap(fold)(a, b) if stacked else fold(a, b)
        merged = kernel.astype(jnp.float32) + delta.astype(jnp.float32) * lora_config.scale
        node["kernel"] = merged.astype(kernel.dtype)
        return node

    return visit(dict(params))


def _flat(tree: Params) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def trainable_matcher(regexes: str | Sequence[str]):
    """'/'-joined parameter path -> whether one of `regexes` full-matches it (what is trained)."""
    patterns = [re.compile(r) for r in ([regexes] if isinstance(regexes, str) else regexes)]
    return lambda path: any(p.fullmatch(path) for p in patterns)


def split_trainable(params: Params, regexes: str | Sequence[str]) -> tuple[Params, Params]:
    """Splits `params` into (trainable, frozen) by full-matching regexes against '/'-joined paths."""
    is_trained = trainable_matcher(regexes)
    trainable, frozen = {}, {}
    for path, leaf in _flat(params).items():
        (trainable if is_trained(path) else frozen)[path] = leaf
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge_trees(*trees: Params) -> Params:
    """Inverse of `split_trainable`: the union of disjoint sparse trees."""
    merged: dict[str, Any] = {}
    for tree in trees:
        flat = _flat(tree)
        clash = merged.keys() & flat.keys()
        if clash:
            raise ValueError(f"trees overlap at {sorted(clash)[:3]}")
        merged.update(flat)
    return traverse_util.unflatten_dict(merged, sep="/")


def lora_paths(params: Params) -> Iterable[str]:
    """The '/'-joined paths of all LoRA leaves (handy for logging what is trainable)."""
    pattern = re.compile(LORA_REGEX)
    return [p for p in _flat(params) if pattern.fullmatch(p)]
