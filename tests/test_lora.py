"""LoRA: zero-init identity, merge == unmerged, peft parity, export through save_hf, tree splitting."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models.llama import Llama
from rsllm_jax.models.lora import (
    LORA_REGEX,
    LoraConfig,
    lora_dropout,
    lora_paths,
    merge_lora,
    merge_trees,
    split_trainable,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_llama_parity import jax_logits, make_tiny_hf, max_masked_diff, ragged_batch, torch_logits  # noqa: E402

LORA = LoraConfig(rank=4, alpha=16, dropout=0.1)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: Llama, key: jax.Array):
    return nn.unbox(model.init(key, jnp.ones((1, 4), jnp.int32))["params"])


def with_lora(config, base_params, seed: int = 0, b_scale: float = 0.0):
    """Base params + freshly initialised LoRA leaves."""
    model = Llama(config, lora=LORA)
    init = _init(model, jax.random.key(seed))
    lora, _ = split_trainable(init, LORA_REGEX)
    if b_scale:
        leaves, treedef = jax.tree.flatten(lora)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        lora = jax.tree.unflatten(
            treedef, [x + b_scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        )
    return model, merge_trees(base_params, lora)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, hf_model = make_tiny_hf(tmp_path_factory.mktemp("lora"))
    return path, hf_model


@pytest.mark.parametrize("scan", [False, True])
def test_zero_b_is_identity(tiny, scan):
    path, hf_model = tiny
    config, base = hf_ckpt.load_hf(path, scan_layers=scan)
    model, params = with_lora(config, base)
    assert lora_paths(params) and all(p.endswith(("lora_a", "lora_b")) for p in lora_paths(params))
    ids, mask = ragged_batch(np.random.default_rng(0), config.vocab_size, [9, 4], left=True)
    ours = jax_logits(model, params, ids, mask)
    assert max_masked_diff(ours, torch_logits(hf_model, ids, mask), mask) < 1e-4


@pytest.mark.parametrize("scan", [False, True])
def test_merged_equals_unmerged_and_exports(tiny, tmp_path, scan):
    path, _ = tiny
    config, base = hf_ckpt.load_hf(path, scan_layers=scan)
    model, params = with_lora(config, base, b_scale=0.05)
    ids, mask = ragged_batch(np.random.default_rng(0), config.vocab_size, [9, 4], left=True)
    unmerged = jax_logits(model, params, ids, mask)
    merged_params = merge_lora(params, LORA)
    assert not lora_paths(merged_params)
    merged = jax_logits(Llama(config), merged_params, ids, mask)
    base_logits = jax_logits(Llama(config), base, ids, mask)
    assert max_masked_diff(unmerged, base_logits, mask) > 1e-2  # the adapter does something
    assert max_masked_diff(merged, unmerged, mask) < 1e-4
    # Export the merged weights and reload them with transformers.
    out = hf_ckpt.save_hf(merged_params, config, tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert max_masked_diff(torch_logits(reloaded, ids, mask), unmerged, mask) < 1e-4
    with pytest.raises(ValueError, match="merge_lora"):
        hf_ckpt.save_hf(params, config, tmp_path / "unmerged")


def test_matches_peft(tiny):
    """Our adapter layout maps 1:1 onto peft's lora_A/lora_B with scaling alpha/r."""
    peft = pytest.importorskip("peft")
    path, hf_model = tiny
    config, base = hf_ckpt.load_hf(path)
    model, params = with_lora(config, base, b_scale=0.05)
    peft_model = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(path).eval(),
        peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=list(LORA.targets)),
    ).eval()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            layer = int(name.split("layers.")[1].split(".")[0])
            group, proj = name.split(".")[-2:]
            ours = params[f"layers_{layer}"][group][proj]
            a, b = np.asarray(ours["lora_a"]), np.asarray(ours["lora_b"])
            # Ours: a [in..., r], b [r, out...]; torch Linear weights are [out, in].
            module.lora_A["default"].weight.copy_(torch.tensor(a.reshape(-1, LORA.rank).T))
            module.lora_B["default"].weight.copy_(torch.tensor(b.reshape(LORA.rank, -1).T))
    ids, mask = ragged_batch(np.random.default_rng(2), config.vocab_size, [7, 5], left=True)
    ours = jax_logits(model, params, ids, mask)
    assert max_masked_diff(ours, torch_logits(peft_model, ids, mask), mask) < 1e-4


def test_dropout_only_in_training(tiny):
    path, _ = tiny
    config, base = hf_ckpt.load_hf(path)
    model, params = with_lora(config, base, b_scale=0.05)
    ids = np.ones((1, 6), np.int32)
    det = jax_logits(model, params, ids)
    det2 = jax_logits(model, params, ids, dropout_rng=jax.random.key(1), deterministic=True)
    train = jax_logits(model, params, ids, dropout_rng=jax.random.key(1), deterministic=False)
    np.testing.assert_array_equal(det, det2)
    assert np.abs(np.asarray(train) - np.asarray(det)).max() > 1e-4


class _Drop(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        return lora_dropout(self, x, self.rate, deterministic)


@pytest.mark.parametrize("width", [64, 63])  # even: 16-bit uniforms; odd: nn.Dropout
def test_lora_dropout_rate_scale_and_fresh_masks(width):
    x = jnp.ones((2048, width), jnp.float32)
    drop = _Drop(0.1)
    y = np.asarray(drop.apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
    dropped = (y == 0).mean()
    # 131k draws: the drop rate is 0.1 within 5 standard errors, and kept values undo the keep rate.
    assert abs(dropped - 0.1) < 5 * np.sqrt(0.1 * 0.9 / y.size), dropped
    np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - round(0.1 * 65536) / 65536) if width % 2 == 0 else 1 / 0.9,
                               rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01  # unbiased
    other = np.asarray(drop.apply({}, x, False, rngs={"dropout": jax.random.key(1)}))
    assert (other != y).any()  # another key, another mask
    # Neighbouring 16-bit halves of one word are independent: no pairwise correlation of the mask.
    if width % 2 == 0:
        a, b = (y[:, 0::2] == 0).ravel(), (y[:, 1::2] == 0).ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    np.testing.assert_array_equal(drop.apply({}, x, True), x)  # deterministic: identity, no rng needed
    np.testing.assert_array_equal(_Drop(0.0).apply({}, x, False), x)


def test_split_and_merge_trees(tiny):
    path, _ = tiny
    config, base = hf_ckpt.load_hf(path, scan_layers=True)
    _, params = with_lora(config, base)
    trainable, frozen = split_trainable(params, [LORA_REGEX])
    flat_t = jax.tree_util.tree_leaves_with_path(trainable)
    assert len(flat_t) == 2 * len(LORA.targets)  # one stacked (a, b) pair per target
    assert all(str(p[-1].key).startswith("lora_") for p, _ in flat_t)
    assert "lora_a" not in str(jax.tree.structure(frozen))
    jax.tree.map(np.testing.assert_array_equal, merge_trees(trainable, frozen), params)
    # Gradients flow only into the trainable subtree.
    model = Llama(config, lora=LORA)

    def loss(t, f):
        return model.apply({"params": merge_trees(t, f)}, np.ones((1, 4), np.int32)).mean()

    grads = jax.jit(jax.grad(loss))(trainable, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="overlap"):
        merge_trees(trainable, params)


@pytest.mark.parametrize("scan", [False, True])
def test_decoding_with_lora_folded_equals_unmerged(tiny, scan):
    """The Evaluator decodes with `for_inference` (LoRA folded into the kernels): same greedy tokens and
    final logits as decoding through the adapter factors, and the folded model has no LoRA left."""
    from rsllm_jax.models.generate import for_inference, generate

    path, _ = tiny
    config, base = hf_ckpt.load_hf(path, scan_layers=scan)
    model, params = with_lora(config, base, b_scale=0.05)
    folded_model, folded = for_inference(model, params)
    assert folded_model.lora is None and not lora_paths(folded)
    ids, mask = ragged_batch(np.random.default_rng(1), config.vocab_size, [9, 4, 6], left=True)
    a, la = generate(model, params, ids, attention_mask=mask, max_new_tokens=6)
    b, lb = generate(folded_model, folded, ids, attention_mask=mask, max_new_tokens=6)
    base_tokens, _ = generate(Llama(config), base, ids, attention_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert (np.asarray(base_tokens) != np.asarray(a)).any()  # the adapter changes what is generated


def test_lora_path_gradients_equal_autodiff():
    """The hand-written backward of `lora_path` is the plain autodiff one (and first-order correct)."""
    from jax.test_util import check_grads

    from rsllm_jax.models.lora import lora_path

    k = jax.random.split(jax.random.key(0), 4)
    x, a, b = (jax.random.normal(k[0], (12, 6)), jax.random.normal(k[1], (6, 3)), jax.random.normal(k[2], (3, 5)))
    g = jax.random.normal(k[3], (12, 5))
    ours = jax.vjp(lora_path, x, a, b)[1](g)
    plain = jax.vjp(lambda x, a, b: (x @ a) @ b, x, a, b)[1](g)
    for o, p in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(o), np.asarray(p), rtol=1e-5, atol=1e-5)
    check_grads(lora_path, (x, a, b), order=1, modes=("rev",))
