"""Shared-prefix continuation scoring equals teacher forcing on each full prompt + continuation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rsllm_jax.models.generate import left_pad
from rsllm_jax.models.llama import Llama, LlamaConfig
from rsllm_jax.models.score import continuation_logprobs, packed_length

TINY = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, rope_theta=1000.0)


def _reference(model, params, prompt, cont):
    """log p(cont | prompt) per token from one uncached forward pass over prompt + cont."""
    ids = jnp.asarray([prompt + cont], jnp.int32)
    logits = model.apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    t = len(prompt)
    return np.asarray([logp[t - 1 + j, tok] for j, tok in enumerate(cont)])


def test_continuation_logprobs_match_teacher_forcing():
    model = Llama(TINY)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)  # peaked logits: a real test
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    conts = [[[20, 21, 22], [23], [24, 25, 26, 27]], [[30, 31], [32, 33, 34, 35], [36]]]
    ids, mask = left_pad(prompts, pad_id=0)
    length = max(len(c) for row in conts for c in row)
    cids = np.zeros((2, 3, length), np.int32)
    cmask = np.zeros((2, 3, length), np.int32)
    for b, row in enumerate(conts):
        for k, c in enumerate(row):
            cids[b, k, : len(c)] = c
            cmask[b, k, : len(c)] = 1
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
    # Packed rows of the exact need (8 tokens: a row's continuations end to end), of the rounded
    # length the evaluator uses, and of the K * L default: every token's score is teacher forcing's.
    assert packed_length(cmask, multiple=1) == 8 and packed_length(cmask) == 32
    for packed_len in (8, packed_length(cmask), None):
        got = np.asarray(continuation_logprobs(model, params, inputs_embeds=embeds, attention_mask=jnp.asarray(mask),
                                               continuation_ids=jnp.asarray(cids), continuation_mask=jnp.asarray(cmask),
                                               packed_len=packed_len))
        assert got.shape == (2, 3, length)
        for b, row in enumerate(conts):
            for k, c in enumerate(row):
                np.testing.assert_allclose(got[b, k, : len(c)], _reference(model, params, prompts[b], c), atol=1e-4)
                assert (got[b, k, len(c):] == 0).all()
    # Distinct continuations get distinct scores (the test would pass trivially on constant output otherwise).
    assert len({round(float(x), 4) for x in got.sum(-1).ravel()}) == 6


def test_segment_ids_keep_packed_sequences_apart():
    """Two sequences packed in one row score as each alone; without segment ids the second sees the first."""
    model = Llama(TINY)
    params = model.init(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
    a, c = [5, 6, 7], [8, 9, 10, 11]
    packed = jnp.asarray([a + c], jnp.int32)
    positions = jnp.asarray([list(range(3)) + list(range(4))], jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    got = np.asarray(model.apply({"params": params}, packed, positions=positions, segment_ids=seg))
    alone_c = np.asarray(model.apply({"params": params}, jnp.asarray([c], jnp.int32)))
    np.testing.assert_allclose(got[0, 3:], alone_c[0], atol=1e-5)
    np.testing.assert_allclose(got[0, :3], np.asarray(model.apply({"params": params}, jnp.asarray([a])))[0], atol=1e-5)
    mixed = np.asarray(model.apply({"params": params}, packed, positions=positions))
    assert np.abs(mixed[0, 3:] - alone_c[0]).max() > 1e-3
