"""Orbax round trip of state + Grain iterator position, atomicity, and the best slot."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rsllm_jax.checkpoint.manager import RunCheckpoints


def _state(seed):
    params = {"w": jax.random.normal(jax.random.key(seed), (4, 3)), "b": jnp.zeros((3,))}
    tx = optax.adam(1e-3)
    return dict(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=tx.init(params))


def _iter():
    return iter(grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset())


def test_round_trip_state_iterator_and_meta(tmp_path):
    ckpts = RunCheckpoints(str(tmp_path), keep=2)
    state = _state(7)
    it = _iter()
    for _ in range(3):
        next(it)
    ckpts.save(3, state, it, meta={"epoch": 1, "best_hr1": 0.25})
    expected_next = [next(it) for _ in range(2)]
    ckpts.wait()

    fresh = RunCheckpoints(str(tmp_path), keep=2)
    it2 = _iter()
    step, restored, meta = fresh.restore_latest(jax.eval_shape(lambda: _state(0)), it2)
    assert step == 3 and meta == {"epoch": 1, "best_hr1": 0.25}
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    for want in expected_next:
        np.testing.assert_array_equal(next(it2), want)


def test_keep_n_and_best_slot(tmp_path):
    ckpts = RunCheckpoints(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpts.save(step, _state(step), _iter())
    ckpts.save_best(2, _state(2), {"hr1": 0.5})
    ckpts.wait()
    assert sorted(ckpts.latest.all_steps()) == [2, 3]
    step, best, meta = ckpts.restore_best(jax.eval_shape(lambda: _state(0)))
    assert step == 2 and meta["metrics"] == {"hr1": 0.5}
    np.testing.assert_array_equal(best["params"]["w"], _state(2)["params"]["w"])
    # Nothing half-written is left behind.
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if "tmp" in p]
