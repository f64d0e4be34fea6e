"""Ranking metrics shared by SASRec and the two-tower protocol: HR@1 on frozen candidates, HR@K/NDCG@K."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def candidate_hit_at_1(candidate_scores, candidates, targets):
    """1 where the top-scored of the 20 candidates is the target. Ties go to the lowest index,
    so a constant scorer hits only when the target happens to be listed first (chance level)."""
    best = jnp.take_along_axis(candidates, jnp.argmax(candidate_scores, axis=-1)[:, None], axis=-1)[:, 0]
    return (best == targets).astype(jnp.float32)


def target_rank(all_scores, targets, exclude=None):
    """0-based rank of each target among all items (strictly higher scores count; ties favour the
    target, as is conventional). `exclude` [B, L] item ids (e.g. the history, padded with any id
    >= num_items) are pushed to -inf unless they are the target."""
    scores = jnp.asarray(all_scores, jnp.float32)
    if exclude is not None:
        num_items = scores.shape[-1]
        rows = jnp.arange(scores.shape[0])[:, None]
        keep = (exclude >= num_items) | (exclude == targets[:, None])
        idx = jnp.where(keep, num_items, jnp.asarray(exclude))  # out-of-range index -> dropped by mode='drop'
        scores = scores.at[rows, idx].set(-jnp.inf, mode="drop")
    target_score = jnp.take_along_axis(scores, targets[:, None], axis=-1)
    return jnp.sum(scores > target_score, axis=-1)


def hr_ndcg_at_k(ranks, k: int = 10):
    """Per-example HR@k and NDCG@k from 0-based ranks (one relevant item)."""
    ranks = jnp.asarray(ranks)
    hit = ranks < k
    return hit.astype(jnp.float32), jnp.where(hit, 1.0 / jnp.log2(ranks + 2.0), 0.0)


def mean_of(values, valid=None) -> float:
    """Mean over real (non-padding) examples."""
    values = np.asarray(values, dtype=np.float64)
    if valid is None:
        return float(values.mean()) if values.size else float("nan")
    valid = np.asarray(valid, dtype=bool)
    return float(values[valid].mean()) if valid.any() else float("nan")
