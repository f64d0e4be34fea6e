"""Log-likelihoods of K continuations of each prompt, sharing the prompt's KV cache.

Ranking the 20 candidates by how likely the LLM finds each as the answer is a readout that cannot be
invalid (every row gets a ranking, unlike a generated answer that may name no candidate), so it
separates "the model knows the user's preference" from "the model produces a well-formed answer".
The prompt is prefilled once; then its K continuations are packed end to end into one row per prompt
(each a segment that sees the prompt and its own earlier tokens, positions continuing the prompt's),
so scoring costs one prefill plus the continuations' real tokens: no copy of the cache per
continuation, and no padding of every continuation to the longest one.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.llama import Llama, init_cache


def packed_length(continuation_mask, multiple: int = 32) -> int:
    """The packed row length that fits every prompt's continuations (host side, rounded up so batches
    share compiled shapes): pass it as `continuation_logprobs(..., packed_len=)`."""
    need = int(np.asarray(continuation_mask).reshape(len(continuation_mask), -1).sum(-1).max())
    return max(multiple, -(-need // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("model", "packed_len"))
def continuation_logprobs(
    model: Llama,
    params: Any,
    *,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array,
    continuation_ids: jax.Array,
    continuation_mask: jax.Array,
    packed_len: int | None = None,
) -> jax.Array:
    """Per-token log p(continuation | prompt), [B, K, L] (0 where continuation_mask is 0).

    inputs_embeds [B, T, D] and attention_mask [B, T]: left-padded prompts (as for `generate`).
    continuation_ids / continuation_mask [B, K, L]: K right-padded token sequences per prompt.
    packed_len: the packed row length (`packed_length`); None = K * L, which always fits. A shorter one
    than a row's real continuation tokens would drop tokens: compute it with `packed_length`.
    `params` is the LLM's tree without the {'params': ...} wrapper.
    """
    variables = {"params": params}
    b, t = attention_mask.shape
    _, k, length = continuation_ids.shape
    p = k * length if packed_len is None else packed_len
    cmask = continuation_mask.astype(bool)
    # Packed slot of token j of continuation c: the lengths of continuations < c, plus j (p = dropped).
    lengths = cmask.sum(-1)  # [B, K]
    offsets = jnp.cumsum(lengths, axis=1) - lengths
    dest = jnp.where(cmask, offsets[..., None] + jnp.arange(length), p)  # [B, K, L]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], dest.shape)

    def pack(values, fill):
        return jnp.full((b, p), fill, values.dtype).at[rows, dest].set(values, mode="drop")

    ids = pack(continuation_ids, 0)
    offset = pack(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), dest.shape), 0)  # j within its continuation
    segment = pack(jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32)[:, None], dest.shape), 0)
    valid = pack(cmask, False)

    cache = init_cache(model.config, b, t + p, model.dtype)
    _, hidden, cache = model.apply(variables, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   cache=cache, return_hidden=True, compute_logits=False)
    # The first token of every continuation is predicted by the prompt's last column (left padding puts
    # every row's last prompt token there); token j > 0 by the packed slot before it.
    first = jax.nn.log_softmax(model.apply(variables, hidden[:, -1:], method=Llama.head)[:, 0], axis=-1)  # [B, V]
    _, cont_hidden, _ = model.apply(variables, ids, positions=cache["pos"][:, None] + offset, attention_mask=valid,
                                    segment_ids=segment, cache=cache, return_hidden=True, compute_logits=False)
    rest = jax.nn.log_softmax(model.apply(variables, cont_hidden[:, :-1], method=Llama.head), axis=-1)
    lp_prev = jnp.take_along_axis(rest, ids[:, 1:, None], axis=-1)[..., 0]  # [B, P-1]: slot s+1 given slot s
    lp_first = jnp.take_along_axis(first, ids, axis=-1)  # [B, P]
    lp = jnp.where(offset == 0, lp_first, jnp.pad(lp_prev, ((0, 0), (1, 0))))
    logp = jnp.take_along_axis(lp, jnp.minimum(dest, p - 1).reshape(b, -1), axis=1).reshape(b, k, length)
    return jnp.where(cmask, logp, 0.0)
