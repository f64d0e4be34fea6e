"""Stage 0 -> stage 1 -> stage 2 -> eval on the tiny config (random tiny LLaMA, synthetic data)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from rsllm_jax.train.optimizer import learning_rate_schedule
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
    # Relative run directories, as `python -m rsllm_jax.report.experiments` passes them (orbax wants absolute).
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
    c2.optim.clip_scope = "group"  # stage 1 above runs the default global clip
    r2 = run_stage(c2, str(tmp_path / "stage2"), llm=llm)
    vals = [m for m in _metrics(tmp_path / "stage2") if "val/accuracy" in m]
    assert [m["step"] for m in vals] == list(range(1, r2["steps"] + 1))
    best = max(vals, key=lambda m: m["val/accuracy"])  # first maximum, as the trainer keeps it
    assert r2["best_step"] == best["step"] and (tmp_path / "stage2" / "best" / str(best["step"])).is_dir()
    for key in ("valid_ratio", "hit_ratio_at_1", "accuracy", "two_tower_hr1", "two_tower_hr10", "two_tower_ndcg10"):
        assert 0.0 <= r2["test"][key] <= 1.0, key
    losses = [m for m in _metrics(tmp_path / "stage2") if "nip" in m]
    assert losses and all(np.isfinite([m["nip"], m["l_ut"], m["l_tt"]]).all() for m in losses)
    # "lr" is the rate the logged update applied: optax counts from 0, so warm-up's first update is at 0.
    o = c2.optim
    schedule = learning_rate_schedule(o.lr, r2["steps"], o.warmup_fraction, o.min_lr_ratio)
    assert losses[0]["step"] == 1 and losses[0]["lr"] == 0.0
    assert [m["lr"] for m in losses] == [float(schedule(m["step"] - 1)) for m in losses]
    # The gradient norm split by top-level group; the groups' norms make up the global one (step by step: a
    # logged row holds the means over the steps since the previous row, so check the one-step rows).
    single = [m for i, m in enumerate(losses) if m["step"] - (losses[i - 1]["step"] if i else 0) == 1]
    assert single
    for m in single:
        groups = {k: v for k, v in m.items() if k.startswith("grad_norm/")}
        assert {"grad_norm/llm", "grad_norm/projector"} <= set(groups), sorted(m)
        assert np.sqrt(sum(v * v for v in groups.values())) == pytest.approx(m["grad_norm"], rel=1e-4)
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

    # The candidate-likelihood readout, alone (no generation): every row gets a ranking of its candidates,
    # and that ranking is the one teacher forcing gives (the NIP loss's own log-likelihoods per answer).
    ce.eval.generate, ce.eval.score_candidates = False, True
    ml = run_eval(ce, str(tmp_path / "eval_ll"), llm=llm)
    assert ml["n"] == r2["test"]["n"] and "valid_ratio" not in ml
    assert 0.0 <= ml["likelihood_hr1"] <= 1.0 and 0.0 <= ml["likelihood_sum_hr1"] <= 1.0
    assert 1.0 <= ml["likelihood_mean_rank"] <= 20.0
    assert ml["likelihood_copy_nats"] >= 0.0 and ml["likelihood_choice_nats"] >= 0.0
    assert ml["likelihood_target_nats"] == pytest.approx(ml["likelihood_copy_nats"] + ml["likelihood_choice_nats"])
    assert ml["two_tower_hr1"] == r2["test"]["two_tower_hr1"]  # the other readouts are untouched
    preds = [json.loads(line) for line in (tmp_path / "eval_ll" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == ml["n"] and "output" not in preds[0]
    assert np.mean([p["likelihood_target_rank"] == 1 for p in preds]) == ml["likelihood_hr1"]
    _check_likelihood_ranks_against_teacher_forcing(ce, llm, preds[:3])


def _check_likelihood_ranks_against_teacher_forcing(cfg, llm, preds):
    import jax
    import jax.numpy as jnp

    from rsllm_jax import sharding
    from rsllm_jax.data.splits import eval_subset
    from rsllm_jax.train.rsllm_setup import build_rsllm
    from rsllm_jax.checkpoint.run_dirs import restore_trainable
    from rsllm_jax.train.rsllm_trainer import prompt_builder, split_for

    split = split_for(cfg, cfg.data.dataset)
    rec_table = np.load(os.path.join(cfg.checkpoint, "item_embeddings.npy"))
    built = build_rsllm(cfg, sharding.make_mesh(cfg.mesh), num_items=split.num_items, rec_table=rec_table,
                        extra_params=restore_trainable(cfg.checkpoint), llm=llm, seed=cfg.seed)
    builder = prompt_builder(cfg, built.tokenizer, split, built.model.config.llm.vocab_size)
    params = jax.device_get(built.params)
    records = eval_subset(split.test, cfg.eval.max_rows)
    for p in preds:
        rec = records[p["row"]]
        means, sums, first = [], [], []
        for c in rec["candidates"]:
            ex = builder.render(rec["history"], rec["candidates"], c, cfg.prompts.eval_template, True)
            logits, _ = built.model.apply({"params": params}, ex["input_ids"][None], ex["attention_mask"][None],
                                          ex["slot_items"][None])
            # Labels of prompt positions may be added-token ids past the LM vocabulary: gather answer labels only.
            pos = np.flatnonzero(ex["loss_mask"])
            logp = jax.nn.log_softmax(logits[0, pos])[np.arange(len(pos)), ex["labels"][pos]]
            means.append(float(jnp.mean(logp)))
            sums.append(float(jnp.sum(logp)))
            first.append(float(logp[0]))
        means, sums, t = np.asarray(means), np.asarray(sums), p["target_position"]
        assert p["likelihood_target_rank"] == int(np.sum(means >= means[t]))
        assert p["likelihood_top_position"] == int(np.argmax(means))
        # Every candidate's score is kept, listed as the record's candidates.
        assert p["candidates"] == [int(c) for c in rec["candidates"]]
        np.testing.assert_allclose(p["likelihood_scores"], means, rtol=1e-3, atol=1e-3)
        # The target's answer loss splits into copying a candidate and choosing the target among them.
        log_mass = np.logaddexp.reduce(sums)
        np.testing.assert_allclose(p["likelihood_copy_nats"], -log_mass, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(p["likelihood_choice_nats"], log_mass - sums[t], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(p["likelihood_first_token_nats"], -first[t], rtol=1e-3, atol=1e-3)
