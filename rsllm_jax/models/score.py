"""Log-likelihoods of K continuations of each prompt, sharing the prompt's KV cache.

Ranking the 20 candidates by how likely the LLM finds each as the answer is a readout that cannot be
invalid (every row gets a ranking, unlike a generated answer that may name no candidate), so it
separates "the model knows the user's preference" from "the model produces a well-formed answer".
The prompt is prefilled once; its cache is repeated K times and all continuations run as one batch,
so scoring 20 candidates costs about one prefill plus 20 short passes instead of 20 prefills.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rsllm_jax.models.llama import Llama, init_cache


def _repeat_rows(cache: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """Repeat every prompt's cache row k times (row b -> rows b*k .. b*k+k-1)."""
    return dict(
        k=jnp.repeat(cache["k"], k, axis=1),  # [layers, B, S, kv_heads, head_dim]
        v=jnp.repeat(cache["v"], k, axis=1),
        mask=jnp.repeat(cache["mask"], k, axis=0),
        pos=jnp.repeat(cache["pos"], k, axis=0),
        index=cache["index"],  # shared write slot: prompts are left-padded to one length
    )


@functools.partial(jax.jit, static_argnames=("model",))
def continuation_logprobs(
    model: Llama,
    params: Any,
    *,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array,
    continuation_ids: jax.Array,
    continuation_mask: jax.Array,
) -> jax.Array:
    """Per-token log p(continuation | prompt), [B, K, L] (0 where continuation_mask is 0).

    inputs_embeds [B, T, D] and attention_mask [B, T]: left-padded prompts (as for `generate`).
    continuation_ids / continuation_mask [B, K, L]: K right-padded token sequences per prompt.
    `params` is the LLM's tree without the {'params': ...} wrapper.
    """
    variables = {"params": params}
    b, t = attention_mask.shape
    _, k, length = continuation_ids.shape
    cache = init_cache(model.config, b, t + length, model.dtype)
    _, hidden, cache = model.apply(variables, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   cache=cache, return_hidden=True, compute_logits=False)
    # The first continuation token is predicted by the prompt's last column (left padding puts every
    # row's last prompt token there); token j > 0 by continuation position j - 1.
    first = jax.nn.log_softmax(model.apply(variables, hidden[:, -1:], method=Llama.head)[:, 0], axis=-1)  # [B, V]
    ids = continuation_ids.reshape(b * k, length)
    mask = continuation_mask.reshape(b * k, length)
    _, cont_hidden, _ = model.apply(variables, ids, attention_mask=mask, cache=_repeat_rows(cache, k),
                                    return_hidden=True, compute_logits=False)
    # Only the first L - 1 positions predict a continuation token; skip the head on the last.
    rest = jax.nn.log_softmax(model.apply(variables, cont_hidden[:, :-1], method=Llama.head), axis=-1)
    lp_first = jnp.take_along_axis(first, continuation_ids[:, :, 0], axis=-1)  # [B, K]
    lp_rest = jnp.take_along_axis(rest, ids[:, 1:, None], axis=-1)[..., 0].reshape(b, k, length - 1)
    logp = jnp.concatenate([lp_first[..., None], lp_rest], axis=-1)
    return jnp.where(continuation_mask.astype(bool), logp, 0.0)
