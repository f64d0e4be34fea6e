"""Gradient clipping scopes of the LLM-stage optimizer (configs/base.py: optim.clip_scope)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from rsllm_jax.train.optimizer import gradient_clipping, make_optimizer


def _grads():
    # One group with a spike (norm 6), one small group (norm 0.2): the stage-2 shape of the problem.
    return {"projector": {"w": jnp.full((4,), 3.0)}, "llm": {"a": jnp.full((4,), 0.1)}}


def _norm(tree):
    return float(optax.tree.norm(tree))


def test_global_scope_scales_every_group_by_the_spike():
    tx = gradient_clipping(1.0, "global")
    out, _ = tx.update(_grads(), tx.init(_grads()))
    assert _norm(out) == pytest.approx(1.0, rel=1e-5)
    # The small group is throttled by the other group's spike: 0.2 * 1 / sqrt(36 + 0.04).
    assert _norm(out["llm"]) == pytest.approx(0.2 / np.sqrt(36.04), rel=1e-5)


def test_group_scope_clips_each_group_on_its_own():
    tx = gradient_clipping(1.0, "group")
    out, _ = tx.update(_grads(), tx.init(_grads()))
    assert _norm(out["projector"]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(out["llm"]["a"], _grads()["llm"]["a"])  # under the bound: untouched
    # Direction within a group is kept.
    np.testing.assert_allclose(out["projector"]["w"], np.full((4,), 0.5), rtol=1e-6)


def test_group_scope_inside_jit_and_same_state_tree_as_global():
    cfg = base.get_config()
    params = jax.tree.map(jnp.zeros_like, _grads())
    states = {}
    for scope in ("global", "group"):
        cfg.optim.clip_scope = scope
        tx = make_optimizer(cfg.optim, total_steps=10)
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(_grads(), state, params)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(updates))
        states[scope] = jax.tree.structure(state)
    # Switching scope on resume restores into the same optimizer-state tree.
    assert states["global"] == states["group"]


def test_unknown_scope_names_the_config_field():
    with pytest.raises(ValueError, match=r"config\.optim\.clip_scope"):
        gradient_clipping(1.0, "per_layer")
