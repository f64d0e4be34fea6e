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


def test_half_deleted_old_step_is_removed_on_open_and_newest_kept(tmp_path):
    """A kill while orbax deletes an old step leaves its directory without the commit marker."""
    ckpts = RunCheckpoints(str(tmp_path), keep=3)
    for step in (1, 2, 3):
        ckpts.save(step, _state(step), _iter())
    ckpts.save_best(2, _state(2), {"hr1": 0.5})
    ckpts.wait()
    ckpts.close()
    (tmp_path / "checkpoints" / "1" / "commit_success.txt").unlink()  # deletion cut short
    os.remove(next(p for p in (tmp_path / "checkpoints" / "1" / "state").rglob("*") if p.is_file()))  # and some data
    (tmp_path / "best" / "2" / "commit_success.txt").unlink()  # the newest of a slot is never removed

    fresh = RunCheckpoints(str(tmp_path), keep=3)
    assert sorted(fresh.latest.all_steps()) == [2, 3]
    assert not (tmp_path / "checkpoints" / "1").exists()
    assert fresh.best_step() == 2


def test_saving_a_step_already_committed_keeps_it(tmp_path):
    """Killed between the best save and the resumable one, a resumed run re-reaches the same step."""
    ckpts = RunCheckpoints(str(tmp_path), keep=2)
    ckpts.save_best(4, _state(4), {"hr1": 0.5})
    ckpts.save(4, _state(4), _iter())
    ckpts.wait()
    ckpts.save_best(4, _state(4), {"hr1": 0.5})
    ckpts.save(4, _state(4), _iter())
    ckpts.wait()
    step, best, _ = ckpts.restore_best(jax.eval_shape(lambda: _state(0)))
    assert step == 4
    np.testing.assert_array_equal(best["params"]["w"], _state(4)["params"]["w"])
