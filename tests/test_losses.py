"""Losses against straightforward numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rsllm_jax import losses


def _np_info_nce(q, k, tau, ids=None, valid=None):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    s = q @ k.T / tau
    b = len(q)
    valid = np.ones(b, bool) if valid is None else valid
    out = []
    for i in range(b):
        if not valid[i]:
            continue
        cols = [j for j in range(b) if valid[j] and (j == i or ids is None or ids[j] != ids[i])]
        row = s[i, cols]
        out.append(-(s[i, i] - np.log(np.sum(np.exp(row - row.max()))) - row.max()))
    return np.mean(out)


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), temperature=0.05)
    np.testing.assert_allclose(got, _np_info_nce(q, k, 0.05), rtol=1e-5)


def test_duplicate_targets_are_masked_out_of_the_denominator():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    ids = np.array([3, 7, 3, 1, 7, 9])
    valid = np.array([1, 1, 1, 1, 1, 0], bool)
    got = losses.info_nce(jnp.asarray(q), jnp.asarray(k), temperature=0.1, item_ids=jnp.asarray(ids),
                          valid=jnp.asarray(valid))
    np.testing.assert_allclose(got, _np_info_nce(q, k, 0.1, ids, valid), rtol=1e-5)
    # Masking changes the value: the test would catch a loss that ignores item_ids.
    unmasked = losses.info_nce(jnp.asarray(q), jnp.asarray(k), temperature=0.1, valid=jnp.asarray(valid))
    assert abs(float(got) - float(unmasked)) > 1e-3


def test_info_nce_identical_pairs_with_duplicates_is_near_zero():
    # Two rows share a target and an identical key: without masking the loss would be >= log 2.
    k = np.eye(4)[[0, 1, 1, 2]]
    got = losses.info_nce(jnp.asarray(k), jnp.asarray(k), temperature=0.05, item_ids=jnp.array([0, 1, 1, 2]))
    assert float(got) < 1e-3


def test_info_nce_on_a_sharded_global_batch_equals_unsharded():
    # Auto axes, as rsllm_jax.sharding.make_mesh builds them: XLA inserts the all-gather of the keys.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    sh = NamedSharding(mesh, P("data", None))
    f = jax.jit(lambda a, b: losses.info_nce(a, b, temperature=0.05))
    got = f(jax.device_put(q, sh), jax.device_put(k, sh))
    np.testing.assert_allclose(got, _np_info_nce(q, k, 0.05), rtol=1e-4)


def test_nip_loss_only_counts_masked_tokens():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 4))
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(lp[b, t, labels[b, t]] for b in range(2) for t in range(4) if mask[b, t]) / mask.sum()
    got, n = losses.nip_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert int(n) == 4
    # Changing an unmasked label changes nothing.
    labels2 = labels.copy()
    labels2[0, 0] = (labels2[0, 0] + 1) % 11
    np.testing.assert_allclose(losses.nip_loss(jnp.asarray(logits), jnp.asarray(labels2), jnp.asarray(mask))[0], got)


def test_pool_and_combine():
    h = jnp.arange(12, dtype=jnp.float32).reshape(1, 4, 3)
    np.testing.assert_allclose(losses.masked_mean_pool(h, jnp.array([[0, 1, 1, 0]])), [[4.5, 5.5, 6.5]])
    assert float(losses.combine(jnp.float32(1.0), jnp.float32(2.0), jnp.float32(3.0), 0.1, 0.1)) == pytest.approx(
        0.8 + 0.2 + 0.3)


def test_nip_loss_ignores_out_of_vocabulary_labels_at_masked_positions():
    logits = jnp.zeros((1, 3, 5))
    labels = jnp.array([[1, 7, 2]])  # 7: an added token id past the LM head
    loss, _ = losses.nip_loss(logits, labels, jnp.array([[1, 0, 1]]))
    np.testing.assert_allclose(loss, np.log(5), rtol=1e-6)
