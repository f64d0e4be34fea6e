"""An interrupted LLM stage resumes from its checkpoint and continues the same loss trajectory."""
import json

import jax
import numpy as np

from configs import tiny
from rsllm_jax.checkpoint.run_dirs import restore_trainable
from rsllm_jax.train.rsllm_trainer import run_stage
from synthetic_data import use_custom_dataset
from tiny_llm import tiny_llm


def _cfg(tmp_path):
    c = use_custom_dataset(tiny.get_llm_config("stage1"), tmp_path)
    c.train.max_train_samples = 64  # batch 16 -> 4 steps
    c.train.checkpoint_every_steps = 100  # only the preemption and final saves
    c.log_every_steps = 1
    c.lora.dropout = 0.1  # dropout keys must also be replayed
    return c


def _losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        rows = [m for m in map(json.loads, f) if "loss" in m]
    steps = [m["step"] for m in rows]
    # Each step trained exactly once: a restart from scratch would log steps 1-2 twice.
    assert len(steps) == len(set(steps)), steps
    return {m["step"]: m["loss"] for m in rows}


def test_interrupted_stage_resumes_on_the_same_trajectory(tmp_path):
    llm = tiny_llm()
    run_stage(_cfg(tmp_path), str(tmp_path / "straight"), llm=llm)

    c = _cfg(tmp_path)
    c.train.stop_after_steps = 2
    assert run_stage(c, str(tmp_path / "resumed"), llm=llm) == {"stage": "stage1", "interrupted_at": 2}
    run_stage(_cfg(tmp_path), str(tmp_path / "resumed"), llm=llm)

    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in (3, 4)], [a[s] for s in (3, 4)], rtol=1e-5)
    pa = restore_trainable(str(tmp_path / "straight"))
    pb = restore_trainable(str(tmp_path / "resumed"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), pa, pb)
