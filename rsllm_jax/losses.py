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


def candidate_distill(first_logits: jax.Array, cand_tokens: jax.Array, teacher_scores: jax.Array, *,
                      temperature: float, valid: jax.Array | None = None) -> jax.Array:
    """Listwise distillation on the first answer token: KL(teacher || student) over the candidates, per row.

    first_logits [B, V]: the LM's logits where it predicts the answer's first token. cand_tokens [B, K]:
    each candidate answer's first token. teacher_scores [B, K]: the teacher's logits for the candidates
    (SASRec's), softened by `temperature` and never differentiated. Candidates that share a first token
    ("The ...") are one outcome for the student, so the teacher's probabilities of such a group are
    summed: the KL is over the distinct first tokens of each row. Mean over valid rows, in nats.
    """
    v = first_logits.shape[-1]
    s = jnp.take_along_axis(first_logits.astype(jnp.float32), jnp.clip(cand_tokens, 0, v - 1), axis=-1)  # [B, K]
    same = (cand_tokens[:, :, None] == cand_tokens[:, None, :]).astype(jnp.float32)  # [B, K, K]
    count = jnp.sum(same, axis=-1)  # candidates sharing each one's first token (>= 1)
    q = jax.nn.softmax(jax.lax.stop_gradient(teacher_scores.astype(jnp.float32)) / temperature, axis=-1)
    q_group = jnp.einsum("bkj,bj->bk", same, q)  # the teacher's mass on each candidate's first token
    # Student over distinct tokens: each token once, i.e. every candidate weighted 1 / count.
    log_p = s - jax.nn.logsumexp(s - jnp.log(count), axis=-1, keepdims=True)
    per_row = jnp.sum(q_group / count * (jnp.log(jnp.maximum(q_group, 1e-30)) - log_p), axis=-1)
    w = jnp.ones(per_row.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def listwise_softmax(scores: jax.Array, *, temperature: float, candidate_valid: jax.Array | None = None,
                     valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """-log softmax(scores / temperature)[target] over each row's candidates, the target in column 0.

    scores [B, K]: the LM's candidate scores (mean answer-token log-likelihoods); candidate_valid [B, K]
    drops columns (a negative with the target's own answer); valid [B] drops padding rows. Returns
    (mean loss over valid rows, share of valid rows whose target scores highest)."""
    s = scores.astype(jnp.float32) / temperature
    if candidate_valid is not None:
        s = jnp.where(candidate_valid.astype(bool), s, _NEG)
    per_row = jax.nn.logsumexp(s, axis=-1) - s[:, 0]
    top = (jnp.argmax(s, axis=-1) == 0).astype(jnp.float32)
    w = jnp.ones(per_row.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    return jnp.sum(per_row * w) / n, jnp.sum(top * w) / n
