"""The one training loop (train/loop.py): its bookkeeping on a toy stage, and resume equality for the stages
the other test files do not interrupt (P2Rec's reconstruction, `resume_from`)."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rsllm_jax.checkpoint.run_dirs import restore_subtree, restore_trainable
from rsllm_jax.train import loop, preemption
from synthetic_data import use_custom_dataset, write_custom_dataset
from tiny_llm import tiny_llm


def _rows(workdir, drop=("samples_per_s", "tokens_per_s", "users_per_s")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


# ---------------------------------------------------------------- a toy stage: w += batch, val = a fixed curve
def _toy(total=12, val_curve=(1.0, 3.0, 2.0, 2.5, 0.0, 9.0), patience=0, stop_after=0, every=2, log_every=3):
    def step(st, batch):
        st = dict(step=st["step"] + 1, w=st["w"] + jnp.float32(batch))
        return st, {"loss": st["w"] * 1.0}, 1

    return loop.Stage(
        name="toy", total_steps=total, state=dict(step=jnp.zeros((), jnp.int32), w=jnp.zeros((), jnp.float32)),
        batches=iter(grain.MapDataset.source(list(range(1, 100)))), step=step, saveable=lambda st: st,
        load=lambda st, saved: saved, checkpoint_due=lambda done: done % 4 == 0,
        validation=loop.Validation(due=lambda done: done % every == 0,
                                   run=lambda st: {"score": val_curve[int(st["step"]) // every - 1]},
                                   score=lambda v: v["score"], describe=lambda done, v: f"val {v}",
                                   patience=patience),
        stop_after_steps=stop_after, log_every_steps=log_every, max_nonfinite_steps=3)


def test_loop_logs_window_means_and_restores_the_best(tmp_path):
    out = loop.run(_toy(), str(tmp_path))
    rows = _rows(tmp_path)
    train = [r for r in rows if "loss" in r]
    # w after step s is 1+2+...+s; a logged row is the mean over the steps since the previous one.
    w = np.cumsum(np.arange(1, 13))
    assert [r["step"] for r in train] == [1, 3, 6, 9, 12]
    np.testing.assert_allclose([r["loss"] for r in train], [w[0], w[1:3].mean(), w[3:6].mean(), w[6:9].mean(),
                                                           w[9:12].mean()])
    assert [r["val/score"] for r in rows if "val/score" in r] == [1.0, 3.0, 2.0, 2.5, 0.0, 9.0]
    assert out.best_step == 12 and int(out.state["step"]) == 12 and out.best_meta["metrics"] == {"score": 9.0}


def test_loop_early_stops_and_a_restart_trains_no_further(tmp_path):
    out = loop.run(_toy(patience=3), str(tmp_path))
    # Best 3.0 at step 4; 2.0, 2.5, 0.0 are three evaluations without a gain: stop after step 10.
    assert out.best_step == 4 and float(out.state["w"]) == sum(range(1, 5))
    assert max(r["step"] for r in _rows(tmp_path)) == 10
    again = loop.run(_toy(patience=3), str(tmp_path))
    assert again.best_step == 4 and max(r["step"] for r in _rows(tmp_path)) == 10


@pytest.mark.parametrize("cut", [("halt", 5), ("sigterm", 7)])
def test_loop_interrupted_anywhere_resumes_to_the_unbroken_run(tmp_path, monkeypatch, cut):
    how, at = cut
    want = loop.run(_toy(), str(tmp_path / "straight"))
    work = str(tmp_path / "cut")
    if how == "halt":
        assert loop.run(_toy(stop_after=at), work).interrupted_at == at
    else:
        calls = []
        monkeypatch.setattr(preemption.Preemption, "requested", lambda self: calls.append(1) or len(calls) == at)
        with pytest.raises(preemption.Preempted, match=f"toy: preempted .* after step {at}"):
            loop.run(_toy(), work)
        monkeypatch.setattr(preemption.Preemption, "requested", lambda self: False)
    got = loop.run(_toy(), work)
    assert _rows(work) == _rows(tmp_path / "straight")  # the log window travelled in the checkpoint
    assert got.best_step == want.best_step and float(got.state["w"]) == float(want.state["w"])


def test_loop_stops_after_n_nonfinite_steps_in_a_row(tmp_path):
    stage = _toy()
    real = stage.step
    stage.step = lambda st, b: (lambda s, m, n: (s, {"loss": m["loss"] * (jnp.nan if b > 4 else 1.0)}, n))(*real(st, b))
    with pytest.raises(FloatingPointError, match=r"toy: 3 non-finite steps in a row \(steps 5-7"):
        loop.run(stage, str(tmp_path))


def test_resume_from_an_unknown_run_names_it(tmp_path):
    stage = _toy()
    stage.resume_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="resume_from=.*nowhere.*no checkpoint"):
        loop.run(stage, str(tmp_path / "run"))


# ---------------------------------------------------------------- real stages
def _stage1(tmp_path, **train):
    c = use_custom_dataset(tiny.get_llm_config("stage1"), tmp_path)
    c.train.max_train_samples = 64  # batch 16 -> 4 steps
    c.train.checkpoint_every_steps = 100
    c.log_every_steps = 1
    for k, v in train.items():
        c.train[k] = v
    return c


def test_stage1_forked_with_resume_from_continues_the_source_trajectory(tmp_path):
    from rsllm_jax.train.rsllm_trainer import run_stage

    llm = tiny_llm()
    run_stage(_stage1(tmp_path), str(tmp_path / "straight"), llm=llm)
    run_stage(_stage1(tmp_path, stop_after_steps=2), str(tmp_path / "source"), llm=llm)
    run_stage(_stage1(tmp_path, resume_from=str(tmp_path / "source")), str(tmp_path / "fork"), llm=llm)
    straight = {r["step"]: r["loss"] for r in _rows(tmp_path / "straight") if "loss" in r}
    fork = {r["step"]: r["loss"] for r in _rows(tmp_path / "fork") if "loss" in r}
    assert sorted(fork) == [3, 4]  # the fork trains only what the source had not
    np.testing.assert_allclose([fork[s] for s in (3, 4)], [straight[s] for s in (3, 4)], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7),
                 restore_trainable(str(tmp_path / "straight")), restore_trainable(str(tmp_path / "fork")))
    assert sorted(os.listdir(tmp_path / "source" / "checkpoints")) == ["2"]  # the source is read, not written


def test_p2rec_reconstruct_preempted_resumes_to_the_unbroken_run(tmp_path, monkeypatch):
    from rsllm_jax.p2rec import reconstruct
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    inter, items = write_custom_dataset(tmp_path / "data")

    def cfg(stage):
        c = tiny.get_p2rec_config(stage)
        c.data.dataset, c.data.custom_interactions, c.data.custom_items = "custom", inter, items
        c.data.cache_dir = str(tmp_path / "cache")
        c.p2rec.sasrec_dir = str(tmp_path / "sasrec-custom")
        c.train.eval_every_steps = 1
        return c

    llm = tiny_llm()
    train_sasrec(cfg("sasrec"), str(tmp_path / "sasrec-custom"))
    want = reconstruct.run_reconstruct(cfg("p2rec_reconstruct"), str(tmp_path / "straight"), llm=llm)
    assert want["steps"] >= 3
    calls = []
    monkeypatch.setattr(preemption.Preemption, "requested", lambda self: calls.append(1) or len(calls) == 2)
    with pytest.raises(preemption.Preempted, match="p2rec reconstruct: preempted"):
        reconstruct.run_reconstruct(cfg("p2rec_reconstruct"), str(tmp_path / "cut"), llm=llm)
    monkeypatch.setattr(preemption.Preemption, "requested", lambda self: False)
    got = reconstruct.run_reconstruct(cfg("p2rec_reconstruct"), str(tmp_path / "cut"), llm=llm)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "straight")
    assert got["best_step"] == want["best_step"]
    np.testing.assert_allclose(got["val"]["kl"], want["val"]["kl"], rtol=1e-5)
    a, _ = restore_subtree(str(tmp_path / "straight"), "trainable")
    b, _ = restore_subtree(str(tmp_path / "cut"), "trainable")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), a, b)
