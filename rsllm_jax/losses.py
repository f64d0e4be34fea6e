"""RSLLM's losses (spec §4), all in fp32 with explicit denominators.

NIP: next-item prediction = causal-LM cross-entropy on answer tokens only.
InfoNCE (CALRec form): cosine similarity / temperature with in-batch negatives. Called on global
(sharded) arrays inside the jitted step, so the negatives are the whole global batch, not one
device's slice. Rows whose target item also appears elsewhere in the batch would otherwise be
pushed away from their own positive: those duplicate columns are masked out of the denominator.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_NEG = -1e9  # large finite negative: keeps softmax NaN-free when a row is fully masked


def nip_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked token cross-entropy. logits [B,T,V] predict labels [B,T] (already shifted: position t
    predicts labels[t]); mask [B,T] 1 on answer tokens. Returns (mean loss, token count)."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    # Unmasked labels may be ids the LM head has no row for (added tokens): clip them, and use
    # `where`, not a product, so their (meaningless) values can never turn the sum into NaN.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.clip(labels, 0, logits.shape[-1] - 1))
    n = jnp.sum(mask)
    return jnp.sum(jnp.where(mask > 0, ce, 0.0)) / jnp.maximum(n, 1.0), n


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def info_nce(
    queries: jax.Array,
    keys: jax.Array,
    *,
    temperature: float,
    item_ids: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Mean over valid rows of -log softmax(cos(q_i, k_j)/tau)[i].

    queries, keys: [B, D] (row i of each is a positive pair). item_ids [B]: the target item of each
    row; column j != i with item_ids[j] == item_ids[i] is a false negative and is masked. valid [B]:
    padding rows contribute neither a loss term nor a negative.
    """
    b = queries.shape[0]
    logits = l2_normalize(queries) @ l2_normalize(keys).T / temperature
    eye = jnp.eye(b, dtype=bool)
    drop = jnp.zeros((b, b), dtype=bool)
    if item_ids is not None:
        drop |= (item_ids[:, None] == item_ids[None, :]) & ~eye
    if valid is not None:
        valid = valid.astype(bool)
        drop |= ~valid[None, :]
    logits = jnp.where(drop, _NEG, logits)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(b))
    w = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of hidden [B,T,D] over positions where mask [B,T] is 1 (fp32) -> [B,D]."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def combine(nip: jax.Array, l_tt: jax.Array, l_ut: jax.Array, a: float, b: float, align=None, c: float = 0.0):
    """L = (1 - a - b) * NIP + a * L_TT + b * L_UT (+ c * ID-text alignment, optional, ours)."""
    total = (1.0 - a - b) * nip + a * l_tt + b * l_ut
    if align is not None:
        total = total + c * align
    return total
