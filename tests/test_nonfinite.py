"""The NaN/Inf guard: a non-finite step changes nothing, is logged with its step, N in a row stop the run."""
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rsllm_jax.train.nonfinite import NonFiniteGuard, skip_nonfinite
from test_sasrec_trainer import _cfg, _metrics


def test_a_nonfinite_gradient_leaves_parameters_and_adam_state_unchanged():
    tx = skip_nonfinite(optax.adam(0.1))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    upd, state1 = tx.update({"w": jnp.asarray([1.0, 2.0, 3.0])}, state, params)
    params1 = optax.apply_updates(params, upd)
    assert not np.allclose(params1["w"], 1.0)
    upd, state2 = tx.update({"w": jnp.asarray([1.0, jnp.nan, 3.0])}, state1, params1)
    np.testing.assert_array_equal(optax.apply_updates(params1, upd)["w"], params1["w"])
    np.testing.assert_array_equal(state2.inner_state[0].mu["w"], state1.inner_state[0].mu["w"])
    assert int(state2.total_notfinite) == 1


def test_guard_logs_each_skip_and_stops_after_n_in_a_row(tmp_path):
    class Log(list):
        write = list.append

    log = Log()
    g = NonFiniteGuard(3, "stage2", str(tmp_path), log)
    assert g.check(1, {"loss": 1.0, "grad_norm": 2.0})
    assert not g.check(2, {"loss": float("nan"), "grad_norm": 2.0})
    assert g.check(3, {"loss": 1.0, "grad_norm": 2.0})  # the count restarts after a good step
    assert not g.check(4, {"loss": 1.0, "grad_norm": float("inf")})
    assert not g.check(5, {"loss": float("nan"), "grad_norm": float("nan")})
    with pytest.raises(FloatingPointError, match=r"stage2: 3 non-finite steps in a row \(steps 4-6"):
        g.check(6, {"loss": float("inf"), "grad_norm": 1.0})
    assert [r["step"] for r in log] == [2, 4, 5, 6] and log[0] == {"step": 2, "nonfinite": 1, "loss": "nan"}


def test_sasrec_at_lr_1e6_stops_and_its_last_good_checkpoint_resumes_exactly(tmp_path):
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    def cfg(epochs, lr):
        c = _cfg(tmp_path, epochs)
        c.sasrec.lr, c.sasrec.checkpoint_every_epochs, c.sasrec.eval_every_epochs = lr, 1, 1
        c.log_every_steps, c.max_nonfinite_steps = 1, 4
        return c

    straight, work = str(tmp_path / "straight"), str(tmp_path / "run")
    want = train_sasrec(cfg(3, 5e-3), straight)
    train_sasrec(cfg(1, 5e-3), work)  # one good epoch, checkpointed
    steps_per_epoch = max(r["step"] for r in _metrics(work))
    with pytest.raises(FloatingPointError, match="4 non-finite steps in a row") as e:
        train_sasrec(cfg(3, 1e6), work)  # the same run resumed at a learning rate that diverges
    assert "lower config.sasrec.lr and resume" in str(e.value)
    bad = [r for r in _metrics(work) if r.get("nonfinite")]
    assert len(bad) == 4 and bad[-1]["step"] < 2 * steps_per_epoch  # stopped before the next checkpoint
    assert [r["step"] for r in bad] == list(range(bad[0]["step"], bad[0]["step"] + 4))
    # Resumed at the good rate from the intact checkpoint, it ends exactly where an uninterrupted run does.
    got = train_sasrec(cfg(3, 5e-3), work)
    assert got["test"] == want["test"] and got["val"] == want["val"]
    np.testing.assert_array_equal(np.load(os.path.join(work, "item_embeddings.npy")),
                                  np.load(os.path.join(straight, "item_embeddings.npy")))


def test_llm_stage_skips_nan_steps_without_touching_parameters_then_stops(tmp_path, monkeypatch):
    from configs import tiny
    from rsllm_jax.checkpoint.run_dirs import restore_trainable
    from rsllm_jax.train import rsllm_trainer
    from test_rsllm_stages import _data
    from tiny_llm import tiny_llm

    llm = tiny_llm()
    real = rsllm_trainer.rsllm_objective

    def poisoned(model, loss_cfg):  # every batch's loss (and so its gradient) is NaN
        fn = real(model, loss_cfg)

        def loss(*args, **kwargs):
            out = fn(*args, **kwargs)
            return (out[0] * jnp.nan,) + tuple(out[1:])
        return loss

    monkeypatch.setattr(rsllm_trainer, "rsllm_objective", poisoned)
    c = _data(tiny.get_llm_config("stage1"), tmp_path)
    c.log_every_steps, c.max_nonfinite_steps = 1, 100
    r = rsllm_trainer.run_stage(c, str(tmp_path / "skipped"), llm=llm)  # every step skipped: it still finishes
    rows = [json.loads(x) for x in open(tmp_path / "skipped" / "metrics.jsonl")]
    assert [x["step"] for x in rows if x.get("nonfinite")] == list(range(1, r["steps"] + 1))
    from flax import traverse_util

    flat = traverse_util.flatten_dict(restore_trainable(str(tmp_path / "skipped")), sep="/")
    lora_b = {k: v for k, v in flat.items() if "lora_b" in k}
    assert lora_b and all(not np.asarray(v).any() for v in lora_b.values())  # still the zero init: no update
    c.max_nonfinite_steps = 2
    with pytest.raises(FloatingPointError, match=r"stage1: 2 non-finite steps in a row \(steps 1-2.*lower config.optim.lr"):
        rsllm_trainer.run_stage(c, str(tmp_path / "stopped"), llm=llm)
