"""Stage 0 -> stage 1 -> stage 2 -> eval on the tiny config (random tiny LLaMA, synthetic data)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from configs import tiny
from rsllm_jax.train.rsllm_trainer import run_eval, run_stage
from rsllm_jax.train.sasrec_trainer import train_sasrec
from synthetic_data import write_custom_dataset
from tiny_llm import tiny_llm

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _data(c, tmp_path):
    inter, items = write_custom_dataset(tmp_path / "data")
    c.data.dataset = "custom"
    c.data.custom_interactions, c.data.custom_items = inter, items
    c.data.cache_dir = str(tmp_path / "cache")
    return c


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_stage1_stage2_eval_smoke(tmp_path, monkeypatch):
    # Relative run directories, as `python -m rsllm_jax.experiments` passes them (orbax wants absolute).
    monkeypatch.chdir(tmp_path)
    llm = tiny_llm()
    c0 = _data(tiny.get_config(), tmp_path)
    train_sasrec(c0, str(tmp_path / "sasrec"))

    c1 = _data(tiny.get_llm_config("stage1"), tmp_path)
    r1 = run_stage(c1, str(tmp_path / "stage1"), llm=llm)
    assert r1["test"]["n"] > 0 and 0.0 <= r1["test"]["valid_ratio"] <= 1.0
    # eval_every_steps = 0: no validation inside the loop, the last step is the result.
    assert not list((tmp_path / "stage1" / "best").iterdir()) and r1["best_step"] == r1["steps"]
    assert not [m for m in _metrics(tmp_path / "stage1") if "val/accuracy" in m]

    c2 = _data(tiny.get_llm_config("stage2"), tmp_path)
    c2.stage2.sasrec_dir = "sasrec"
    c2.stage2.stage1_dir = "stage1"
    c2.train.eval_every_steps = 1  # validate every step and keep the best
    r2 = run_stage(c2, str(tmp_path / "stage2"), llm=llm)
    vals = [m for m in _metrics(tmp_path / "stage2") if "val/accuracy" in m]
    assert [m["step"] for m in vals] == list(range(1, r2["steps"] + 1))
    best = max(vals, key=lambda m: m["val/accuracy"])  # first maximum, as the trainer keeps it
    assert r2["best_step"] == best["step"] and (tmp_path / "stage2" / "best" / str(best["step"])).is_dir()
    for key in ("valid_ratio", "hit_ratio_at_1", "accuracy", "two_tower_hr1", "two_tower_hr10", "two_tower_ndcg10"):
        assert 0.0 <= r2["test"][key] <= 1.0, key
    losses = [m for m in _metrics(tmp_path / "stage2") if "nip" in m]
    assert losses and all(np.isfinite([m["nip"], m["l_ut"], m["l_tt"]]).all() for m in losses)
    preds = (tmp_path / "stage2" / "predictions_test.jsonl").read_text().splitlines()
    assert len(preds) == r2["test"]["n"]
    assert {"row", "output", "matched", "hit"} <= set(json.loads(preds[0]))
    for p in map(json.loads, preds):
        assert len(p["named_positions"]) == len(p["named_items"]) == len(p["matched"])
        assert p["hit"] == (p["named_positions"] == [p["target_position"]])
    # The answer-bias report reads the same predictions through the CLI.
    out = tmp_path / "bias"
    subprocess.run([sys.executable, "-m", "rsllm_jax.eval.answer_bias", "--config=" + str(CONFIGS / "tiny.py"),
                    "--config.data.dataset=custom", f"--config.data.custom_interactions={c2.data.custom_interactions}",
                    f"--config.data.custom_items={c2.data.custom_items}", f"--config.data.cache_dir={c2.data.cache_dir}",
                    f"--out={out}", str(tmp_path / "stage2")], check=True, capture_output=True, text=True)
    bias = json.loads(out.with_suffix(".json").read_text())["runs"]["stage2"]
    assert bias["n"] == r2["test"]["n"] and bias["valid"] == round(r2["test"]["valid_ratio"] * bias["n"])

    ce = _data(tiny.get_llm_config("eval"), tmp_path)
    ce.checkpoint = "stage2"
    m = run_eval(ce, str(tmp_path / "eval"), llm=llm)
    assert m["n"] == r2["test"]["n"]
    # Evaluating the saved best checkpoint reproduces the run's own test numbers.
    assert m["accuracy"] == r2["test"]["accuracy"] and m["two_tower_hr1"] == r2["test"]["two_tower_hr1"]
    assert os.path.exists(tmp_path / "eval" / "metrics_test.json")
