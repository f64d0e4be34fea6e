"""Batched autoregressive generation with a KV cache: one jitted prefill + `lax.while_loop` decode.

Prompts are left-padded (RoPE positions come from the attention mask, so padding is invisible), given
either as token ids or as embeddings (the recommender splices projected item embeddings into the
prompt). Each row stops on its first stop token (EOS, or any token whose text contains a stop string
such as a newline); the loop exits early once every row has stopped.

Grounded decoding (`grounded_ids`): each row may only emit one of its K allowed token sequences (the 20
candidates' answers, each ending with its newline), a prefix trie walked on device: at step t the allowed
tokens are position t of every sequence still consistent with what the row emitted, and the row stops
when its sequence is complete. Greedy (or sampled) within the trie, as BIGRec grounds to real items.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.llama import Llama, init_cache
from rsllm_jax.models.lora import merge_lora

_merge_lora = jax.jit(merge_lora, static_argnums=1)


def for_inference(model: Llama, params: Any) -> tuple[Llama, Any]:
    """The LLM to decode with: LoRA folded into the base kernels, so each projection is one matmul
    instead of three (decoding streams every weight once per token; the adapter's extra small matmuls
    and reads are pure overhead there). Training keeps the factors separate; this is inference only."""
    if model.lora is None:
        return model, params
    return model.clone(lora=None), _merge_lora(params, model.lora)


def stop_token_ids(tokenizer: Any, stop_strings: Iterable[str] = ("\n",), include_eos: bool = True) -> np.ndarray:
    """Ids of every vocabulary token whose decoded text contains a stop string (computed once, on host)."""
    stop_strings = tuple(stop_strings)
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)]) if stop_strings else []
    ids = {i for i, text in enumerate(texts) if any(s in text for s in stop_strings)}
    if include_eos and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return np.asarray(sorted(ids), np.int32)


def blank_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids of tokens whose decoded text is only whitespace (e.g. "\n", "\n\n", " ")."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return np.asarray([i for i, t in enumerate(texts) if t and not t.strip()], np.int32)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy when temperature == 0, else nucleus (top-p) sampling at the given temperature."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class _State(NamedTuple):
    step: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    cache: dict[str, jax.Array]
    last_logits: jax.Array
    rng: jax.Array
    started: jax.Array  # a row has produced a token outside `leading_ids`
    alive: jax.Array  # grounded: [B, K] sequences consistent with the emitted prefix ([B, 1] otherwise)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p"))
def generate(
    model: Llama,
    params: Any,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array,
    max_new_tokens: int,
    stop_ids: jax.Array | None = None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    pad_id: int | jax.Array = 0,
    leading_ids: jax.Array | None = None,
    grounded_ids: jax.Array | None = None,
    grounded_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Continues left-padded prompts. Returns (tokens [B, max_new_tokens], lengths [B]).

    `lengths` counts generated tokens including the stop token; positions past it hold `pad_id`.
    `params` is the LLM's params tree (without the {'params': ...} wrapper).
    `leading_ids` (e.g. whitespace-only tokens): a stop token among them does not stop a row that has
    produced nothing else yet, so an answer that starts on a fresh line is not cut to "".
    `grounded_ids` / `grounded_mask` [B, K, L]: the allowed sequences, right-padded (see the module doc);
    L <= max_new_tokens, and `stop_ids` / `leading_ids` are then not used.
    """
    variables = {"params": params}
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    b, t = prompt.shape[:2]
    stop_ids = jnp.zeros((0,), jnp.int32) if stop_ids is None else jnp.asarray(stop_ids, jnp.int32)
    leading_ids = jnp.zeros((0,), jnp.int32) if leading_ids is None else jnp.asarray(leading_ids, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    grounded = grounded_ids is not None
    if grounded:
        grounded_ids = jnp.asarray(grounded_ids, jnp.int32)
        grounded_mask = jnp.asarray(grounded_mask, jnp.bool_)
        if grounded_ids.shape[2] > max_new_tokens:
            raise ValueError(f"grounded sequences of {grounded_ids.shape[2]} tokens need max_new_tokens >= that "
                             f"(got {max_new_tokens})")
        alive = grounded_mask[:, :, 0]
    else:
        alive = jnp.ones((b, 1), jnp.bool_)

    cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
    # Prefill needs the next-token logits of the last column only: skip the vocabulary matmul elsewhere
    # (for SmolLM2 it is a fifth of the prefill FLOPs).
    _, hidden, cache = model.apply(
        variables, input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
        return_hidden=True, compute_logits=False,
    )
    logits = model.apply(variables, hidden[:, -1:], method=Llama.head)
    state = _State(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), jnp.bool_),
        cache=cache,
        last_logits=logits[:, -1],  # left padding puts every row's last prompt token in the last column
        rng=rng,
        started=jnp.zeros((b,), jnp.bool_),
        alive=alive,
    )

    def cond(s: _State) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def trie_step(s: _State, logits: jax.Array):
        """Mask `logits` to the trie's next tokens; returns (masked logits, column of each sequence)."""
        length = grounded_ids.shape[2]
        at = jnp.minimum(s.step, length - 1)
        col = jax.lax.dynamic_index_in_dim(grounded_ids, at, axis=2, keepdims=False)  # [B, K]
        has = s.alive & jax.lax.dynamic_index_in_dim(grounded_mask, at, axis=2, keepdims=False) & (s.step < length)
        allowed = jnp.zeros(logits.shape, jnp.bool_).at[jnp.arange(b)[:, None], col].max(has)
        return jnp.where(allowed, logits, -jnp.inf), col, has

    def body(s: _State) -> _State:
        rng, key = jax.random.split(s.rng)
        logits = s.last_logits
        if grounded:
            logits, col, has = trie_step(s, logits)
        tok = sample_logits(logits, key, temperature, top_p)
        tok = jnp.where(s.done, pad_id, tok)
        tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
        lengths = s.lengths + (~s.done).astype(jnp.int32)
        alive = s.alive
        if grounded:
            alive = has & (col == tok[:, None])
            nxt = jnp.minimum(s.step + 1, grounded_ids.shape[2] - 1)
            more = alive & jax.lax.dynamic_index_in_dim(grounded_mask, nxt, axis=2, keepdims=False)
            done = s.done | ~jnp.any(more & (s.step + 1 < grounded_ids.shape[2]), axis=1)
            started = jnp.ones_like(s.started)
        else:
            leading = jnp.isin(tok, leading_ids)
            done = s.done | (jnp.isin(tok, stop_ids) & (s.started | ~leading))
            started = s.started | ~leading
        logits, cache = model.apply(
            variables, tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=s.cache
        )
        return _State(s.step + 1, tokens, lengths, done, cache, logits[:, -1], rng, started, alive)

    final = jax.lax.while_loop(cond, body, state)
    return final.tokens, final.lengths


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (ids [B, T], mask [B, T]) left-padded to the longest."""
    t = max(len(s) for s in sequences)
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        if not s:
            raise ValueError("empty prompt")
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask
