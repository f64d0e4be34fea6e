"""Cross-fitted SASRec orders (config.prompts.crossfit_folds): every training window is ordered by a
SASRec that never saw its user; validation and test keep the full model's order."""
import json
import zlib

import numpy as np
import pytest

from configs import tiny
from rsllm_jax.config_check import ConfigError, check
from rsllm_jax.data.prompt_pipeline import SasrecOrder
from rsllm_jax.data.splits import load_split_from_config
from rsllm_jax.checkpoint import user_states
from rsllm_jax.train import crossfit


def _data(c, tmp_path):
    from synthetic_data import write_custom_dataset

    inter, items = write_custom_dataset(tmp_path / "data")
    c.data.dataset = "custom"
    c.data.custom_interactions, c.data.custom_items = inter, items
    c.data.cache_dir = str(tmp_path / "cache")
    return c


def test_fold_of_is_a_stable_hash_of_the_user_id():
    assert crossfit.fold_of("42", 2) == zlib.crc32(b"42") % 2
    assert crossfit.fold_of(42, 3) == crossfit.fold_of("42", 3)  # ints and strings name the same user
    folds = [crossfit.fold_of(str(u), 2) for u in range(1000)]
    assert 400 < sum(folds) < 600  # roughly balanced


def test_a_record_with_a_fold_is_ordered_by_that_folds_table():
    rng = np.random.default_rng(0)
    full, f0, f1 = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(3))
    s_full, s_fold = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    order = SasrecOrder(full, np.stack([f0, f1]))
    cands = [0, 1, 2, 3, 4, 5, 6, 7]
    by = lambda table, s: [int(i) for i in np.argsort(-(table @ s), kind="stable")]
    assert order(dict(user_state=s_full), cands) == by(full, s_full)  # val/test: the full model
    assert order(dict(user_state=s_full, order_fold=1, order_state=s_fold), cands) == by(f1, s_fold)
    assert by(f1, s_fold) != by(full, s_full)  # the test can tell the two apart


def test_crossfit_needs_the_sasrec_order_and_two_folds():
    c = tiny.get_llm_config("stage2")
    c.prompts.crossfit_folds = 2
    with pytest.raises(ConfigError, match="candidate_order='sasrec'"):
        check(c, num_devices=1)
    c.prompts.candidate_order = "sasrec"
    check(c, num_devices=1)
    c.prompts.crossfit_folds = 1
    with pytest.raises(ConfigError, match="crossfit_folds=1"):
        check(c, num_devices=1)


def test_fold_models_never_see_their_users_and_stage2_trains_on_their_orders(tmp_path, monkeypatch):
    from rsllm_jax.train.rsllm_trainer import run_stage
    from rsllm_jax.train.sasrec_trainer import train_sasrec
    from tiny_llm import tiny_llm

    monkeypatch.chdir(tmp_path)
    c0 = _data(tiny.get_config(), tmp_path)
    train_sasrec(c0, str(tmp_path / "sasrec"))
    split = load_split_from_config(c0.data)
    c0.prompts.crossfit_folds, c0.prompts.candidate_order = 2, "sasrec"
    dirs = crossfit.ensure_folds(c0, str(tmp_path / "sasrec"), split)
    for k, d in enumerate(dirs):
        res = json.loads(open(f"{d}/results.json").read())
        held_out = sum(crossfit.fold_of(r["user"], 2) == k for r in split.train)
        assert 0 < held_out < len(split.train)
        assert res["train_samples"] == len(split.train) - held_out  # trained on the other fold only
    tables = crossfit.attach(split, dirs)
    assert tables.shape[0] == 2
    for i, r in enumerate(split.train):
        k = crossfit.fold_of(r["user"], 2)
        with np.load(f"{dirs[k]}/{user_states.FILENAME}") as z:
            assert r["order_fold"] == k and np.array_equal(r["order_state"], z["train"][i])
    assert not any("order_fold" in r for r in split.val + split.test)
    # A second call reuses the finished folds (no retraining: the files are untouched).
    stamp = [(tmp_path / d / "item_embeddings.npy").stat().st_mtime_ns for d in dirs]
    crossfit.ensure_folds(c0, str(tmp_path / "sasrec"), split)
    assert stamp == [(tmp_path / d / "item_embeddings.npy").stat().st_mtime_ns for d in dirs]
    # Fold states belong to one training split: another is refused.
    other = load_split_from_config(c0.data)
    other.train = other.train[1:]
    with pytest.raises(ValueError, match="another training split"):
        crossfit.attach(other, dirs)

    c2 = _data(tiny.get_llm_config("stage2"), tmp_path)
    c2.stage2.sasrec_dir, c2.stage2.stage1_dir = "sasrec", "none"
    c2.prompts.candidate_order, c2.prompts.crossfit_folds = "sasrec", 2
    r2 = run_stage(c2, str(tmp_path / "stage2"), llm=tiny_llm())
    assert 0.0 <= r2["crossfit_train_hr10"] <= 1.0 and 0.0 <= r2["full_model_train_hr10"] <= 1.0
    assert 0.0 <= r2["test"]["accuracy"] <= 1.0
