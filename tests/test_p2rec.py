"""P2Rec: the pure pieces against numpy references, the SASRec side table, and a tiny end to end run
(SASRec -> reconstruction with a random tiny LLaMA -> augmentation -> results.json)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rsllm_jax.data import splits
from rsllm_jax.models.sasrec import SASRec, SASRecConfig, item_table, set_item_tables
from rsllm_jax.p2rec import augment, compare, reconstruct
from rsllm_jax.checkpoint.run_dirs import restore_subtree
from rsllm_jax.p2rec.common import TitlePrompts, sasrec_config_from_params
from rsllm_jax.train.sasrec_trainer import train_sasrec
from synthetic_data import write_custom_dataset
from tiny_llm import tiny_llm
from tiny_tokenizer import tiny_tokenizer


# ---------------------------------------------------------------- pure pieces
def test_category_prior_sums_to_one_and_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 30))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assign = rng.integers(0, 4, size=30)
    assign[:4] = np.arange(4)  # every category non-empty
    got = np.asarray(reconstruct.category_prior(jnp.asarray(probs, jnp.float32), jnp.asarray(assign), 4))
    ref = np.stack([probs[:, assign == k].sum(1) for k in range(4)], axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def test_sasrec_priors_match_a_numpy_softmax():
    model = SASRec(SASRecConfig(num_items=12, hidden=8, dropout=0.0))
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))["params"])
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assign = np.arange(12) % 3
    got = reconstruct.sasrec_priors(params, seqs, assign, 3, temperature=2.0, batch_size=4)
    pad = lambda s: jnp.asarray([[12] * (10 - len(s)) + s])  # noqa: E731
    for row, s in zip(got, seqs):
        states = model.apply({"params": params}, pad(s))[:, -1]
        logits = np.asarray(model.apply({"params": params}, states, method=SASRec.score_all))[0] / 2.0
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(row, [probs[assign == k].sum() for k in range(3)], rtol=1e-4, atol=1e-6)
        assert abs(row.sum() - 1.0) < 1e-5


def test_temperature_calibration_picks_the_nll_minimum():
    """Targets drawn from SASRec's own softmax at T = 3 -> calibration lands near 3 (grid step ~1.26x), the
    NLL table agrees with a numpy evaluation, and sharper T means lower entropy."""
    model = SASRec(SASRecConfig(num_items=12, hidden=8, dropout=0.0))
    params = jax.tree.map(np.asarray, model.init(jax.random.key(1), jnp.zeros((1, 10), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)  # sharper logits than at init
    rng = np.random.default_rng(0)
    histories = [rng.choice(12, size=int(rng.integers(1, 8)), replace=False).tolist() for _ in range(2000)]
    assign = np.arange(12)  # one item per category: the category prior is the item softmax
    true_t = 3.0
    probs = reconstruct.sasrec_priors(params, histories, assign, 12, temperature=true_t)
    targets = [int(rng.choice(12, p=p / p.sum())) for p in probs]
    t, table = reconstruct.calibrate_temperature(params, histories, targets, assign, 12)
    assert true_t / 1.6 < t < true_t * 1.6
    row = min(table, key=lambda r: abs(r["temperature"] - 1.0))
    p1 = reconstruct.sasrec_priors(params, histories, assign, 12, temperature=row["temperature"])
    assert row["nll"] == pytest.approx(-np.mean(np.log(p1[np.arange(2000), targets])), rel=1e-4)
    entropies = [r["mean_entropy"] for r in table]
    assert all(a <= b + 1e-6 for a, b in zip(entropies, entropies[1:]))  # hotter -> flatter


def test_kmeans_is_deterministic_and_assigns_nearest_centroid():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=10.0, size=(3, 5))
    x = np.concatenate([c + rng.normal(size=(20, 5)) for c in centers])
    c1, a1 = reconstruct.kmeans(x, 3, iters=50, seed=7)
    c2, a2 = reconstruct.kmeans(x, 3, iters=50, seed=7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(c1, c2)
    d = ((x[:, None, :] - c1[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(a1, d.argmin(1))
    # Well-separated blobs are recovered exactly (up to label order).
    assert all(len(set(a1[i * 20:(i + 1) * 20])) == 1 for i in range(3)) and len(set(a1)) == 3
    with pytest.raises(ValueError, match="num_categories"):
        reconstruct.kmeans(x, 61, iters=5, seed=0)


def test_kl_loss_matches_numpy_and_is_zero_when_equal():
    rng = np.random.default_rng(2)
    prior = rng.dirichlet(np.ones(6), size=4)
    prior[0, 0] = 0.0  # a zero-mass category contributes 0 (0 log 0 = 0)
    prior[0] /= prior[0].sum()
    logits = rng.normal(size=(4, 6))
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.nansum(np.where(prior > 0, prior * (np.log(prior) - np.log(q)), 0.0), axis=1)
    np.testing.assert_allclose(float(reconstruct.kl_to_prior(prior, logits)), ref.mean(), rtol=1e-5)
    valid = np.array([1, 0, 1, 0])
    np.testing.assert_allclose(float(reconstruct.kl_to_prior(prior, logits, valid)), ref[[0, 2]].mean(), rtol=1e-5)
    assert abs(float(reconstruct.kl_to_prior(prior[1:], np.log(prior[1:])))) < 1e-6


def test_one_example_per_user_from_the_last_window():
    records = [
        {"user": "a", "history": [1, 2, 3], "target": 4},
        {"user": "a", "history": [1, 2, 3, 4], "target": 5},
        {"user": "b", "history": [7, 8, 9], "target": 6},
        {"user": "a", "history": [2, 3, 4, 5], "target": 0},
    ]
    full = reconstruct.user_sequences(records, "full", max_len=4)
    assert full == [("a", [3, 4, 5, 0]), ("b", [7, 8, 9, 6])]
    assert reconstruct.user_sequences(records, "history", max_len=10) == [("a", [2, 3, 4, 5]), ("b", [7, 8, 9])]
    with pytest.raises(ValueError, match="user_sequence"):
        reconstruct.user_sequences(records, "last", max_len=4)


def test_cold_counts_are_distinct_user_item_pairs():
    records = [
        {"user": "a", "history": [0, 1, 2], "target": 3},
        {"user": "a", "history": [1, 2, 3], "target": 4},  # overlapping window: 1, 2, 3 counted once for a
        {"user": "b", "history": [0, 3, 3], "target": 5},
    ]
    np.testing.assert_array_equal(splits.item_train_counts(records, 7), [2, 1, 1, 2, 1, 1, 0])


def test_pca_shape_variance_order_and_scale():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 12)) * np.linspace(5, 0.1, 12) @ np.linalg.qr(rng.normal(size=(12, 12)))[0]
    z, ratio = augment.pca(x, 4)
    assert z.shape == (50, 4) and ratio.shape == (4,)
    var = z.var(0)
    assert np.all(np.diff(var) < 0) and np.all(np.diff(ratio) <= 0)
    np.testing.assert_allclose(var / np.var(x - x.mean(0), 0).sum(), ratio, rtol=1e-4)
    np.testing.assert_allclose(np.abs(z.T @ z - np.diag(np.diag(z.T @ z))).max(), 0.0, atol=1e-3)  # uncorrelated
    scaled = augment.match_scale(z, 0.125)
    assert abs(scaled.std() - 0.125) < 1e-6 and np.all(np.diff(scaled.var(0)) < 0)
    with pytest.raises(ValueError, match="reduce='learned'"):
        augment.pca(x, 13)
    t = augment.augmentation_tables(x, 4, "pca", "add")
    assert t["item_init"] is None and t["side_table"].shape == (50, 4) and not t["side_proj"]
    t = augment.augmentation_tables(x, 16, "learned", "init")
    assert t["item_init"].shape == (50, 16) and not t["item_init"].any() and t["side_table"].shape == (50, 12)


def test_title_prompts_pool_masks():
    tok = tiny_tokenizer()
    titles = ["Toy Story", "Heat", "Alien"]
    kw = dict(name="user_prompt", max_title_tokens=2)
    mean = TitlePrompts(tok, titles, "Seen: {history}.\nTaste:", "history", pool="mean", **kw).batch([[0, 1], [2]])
    tit = TitlePrompts(tok, titles, "Seen: {history}.\nTaste:", "history", pool="titles", **kw).batch([[0, 1], [2]])
    last = TitlePrompts(tok, titles, "Seen: {history}.\nTaste:", "history", pool="last", **kw).batch([[0, 1], [2]])
    assert mean["input_ids"].shape[1] % 8 == 0
    np.testing.assert_array_equal(mean["pool_mask"], mean["attention_mask"])
    assert (tit["pool_mask"] <= tit["attention_mask"]).all() and 0 < tit["pool_mask"][1].sum() <= 2
    np.testing.assert_array_equal(last["pool_mask"].sum(1), [1, 1])
    assert last["pool_mask"][0, mean["attention_mask"][0].sum() - 1] == 1
    with pytest.raises(ValueError, match="config.p2rec.user_prompt"):
        TitlePrompts(tok, titles, "no field", "history", pool="mean", **kw)


def test_sasrec_side_table_is_frozen_and_default_is_unchanged():
    plain = SASRec(SASRecConfig(num_items=6, hidden=8)).init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))
    assert "side_table" not in plain["params"] and "side_dense" not in plain["params"]
    model = SASRec(SASRecConfig(num_items=6, hidden=8, dropout=0.0, side_dim=5, side_proj=True))
    params = model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.int32))["params"]
    side = np.arange(30, dtype=np.float32).reshape(6, 5) / 30
    init = np.ones((6, 8), np.float32)
    params = set_item_tables(params, item_init=init, side_table=side)
    np.testing.assert_array_equal(params["item_embedding"]["embedding"][:6], init)
    assert not np.asarray(params["side_table"][6]).any()  # padding row stays zero
    d = params["side_dense"]
    np.testing.assert_allclose(item_table(params), init + side @ d["kernel"] + d["bias"], rtol=1e-5)
    seq = jnp.asarray([[6] * 7 + [0, 1, 2]])
    grads = jax.grad(lambda p: model.apply({"params": p}, seq).sum())(params)
    assert not np.asarray(grads["side_table"]).any() and np.asarray(grads["side_dense"]["kernel"]).any()
    assert sasrec_config_from_params(params) == SASRecConfig(num_items=6, hidden=8, dropout=0.0, side_dim=5,
                                                             side_proj=True)


# ---------------------------------------------------------------- end to end
def _data(c, root):
    inter, items = write_custom_dataset(root / "data")
    c.data.dataset = "custom"
    c.data.custom_interactions, c.data.custom_items = inter, items
    c.data.cache_dir = str(root / "cache")
    return c


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    """A tiny stage-0 SASRec and a reconstruction run on it (shared by the end-to-end tests)."""
    root = tmp_path_factory.mktemp("p2rec")
    llm = tiny_llm()
    c0 = _data(tiny.get_p2rec_config("sasrec"), root)
    sasrec = train_sasrec(c0, str(root / "sasrec-custom"))
    c = _data(tiny.get_p2rec_config("p2rec_reconstruct"), root)
    c.p2rec.sasrec_dir = str(root / "sasrec-custom")
    c.p2rec.prior_temperature = 0.0  # calibrated
    res = reconstruct.run_reconstruct(c, str(root / "p2rec_reconstruct-custom"), llm=llm)
    return root, llm, sasrec, res


def test_reconstruct_trains_one_example_per_user(reconstructed):
    root, _, _, res = reconstructed
    work = root / "p2rec_reconstruct-custom"
    assert res["train_users"] == 48 and res["num_categories"] == 4 and sum(res["category_sizes"]) == 30
    assert np.isfinite(res["val"]["kl"]) and res["val"]["n"] == 6
    assert 0.0 <= res["val_baselines"]["top1_agree_train_mean"] <= 1.0 and res["val_baselines"]["kl_uniform"] > 0
    calib = res["temperature_calibration"]
    assert len(calib) == len(reconstruct.CALIBRATION_GRID) and res["prior_temperature"] in reconstruct.CALIBRATION_GRID
    assert min(r["nll"] for r in calib) == next(r["nll"] for r in calib if r["temperature"] == res["prior_temperature"])
    assert 0.0 <= res["prior_mean_entropy"]["train"] <= np.log(4) + 1e-6
    cats = np.load(work / "categories.npz")
    assert cats["assignments"].shape == (30,) and cats["centroids"].shape == (4, 16)
    logged = [json.loads(line) for line in open(work / "metrics.jsonl")]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert losses and np.isfinite(losses).all() and any("val/kl" in m for m in logged)
    trained, _ = restore_subtree(str(work), "trainable")
    assert set(trained) == {"llm", "p2rec_head"}  # LoRA + head, nothing else


def test_calibration_cli_matches_the_reconstruction_run(reconstructed):
    from rsllm_jax.p2rec import calibrate

    root, _, _, res = reconstructed
    c = _data(tiny.get_p2rec_config("p2rec_reconstruct"), root)
    c.p2rec.sasrec_dir = str(root / "sasrec-custom")
    report = calibrate.calibration_report(c)
    assert report["calibrated_temperature"] == res["prior_temperature"]
    assert report["table"] == res["temperature_calibration"]
    assert report["nll_calibrated"] <= report["nll_at_t1"]


def test_augment_end_to_end_writes_results(reconstructed):
    root, llm, sasrec, _ = reconstructed
    c = _data(tiny.get_p2rec_config("p2rec_augment"), root)
    c.p2rec.mode = "add"  # exercises the frozen side table end to end ('init' is covered by set_item_tables)
    c.p2rec.cold_threshold = 24  # the synthetic items have ~22 users each: make some targets cold
    work = root / "p2rec_augment-custom"
    res = augment.run_augment(c, str(work), llm=llm)
    saved = json.load(open(work / "results.json"))
    for model in ("base", "p2rec"):
        for split in ("val", "test"):
            m = saved[model][split]
            assert m["n"] == 6 and 0.0 <= m["hr1_cand"] <= 1.0 and 0.0 <= m["hr10"] <= 1.0
            assert {"n", "hr1_cand", "hr10", "ndcg10"} <= set(m["cold"])
            rows = m["per_row"]
            assert len(rows["hit1"]) == len(rows["rank"]) == 6 and np.mean(rows["hit1"]) == pytest.approx(m["hr1_cand"])
            assert sum(rows["cold"]) == m["cold"]["n"]
    # The base evaluation reproduces stage 0's own test numbers; the cold rows are those with cold targets.
    for k in ("hr1_cand", "hr10", "ndcg10"):
        assert saved["base"]["test"][k] == pytest.approx(sasrec["test"][k])
    split = _split(c)
    cold = splits.item_train_counts(split.train, split.num_items) < 24
    assert saved["cold_items"] == int(cold.sum()) > 0
    assert saved["base"]["test"]["cold"]["n"] == sum(bool(cold[r["target"]]) for r in split.test)
    emb = np.load(work / "llm_item_embeddings.npy")
    assert emb.shape == (30, 32) and np.isfinite(emb).all()
    # The added LLM table went through training untouched (no gradients, no optimizer updates).
    params, _ = restore_subtree(str(work / "sasrec_p2rec"), "params")
    expected = augment.augmentation_tables(emb, 16, "pca", "add")["side_table"]
    np.testing.assert_array_equal(params["side_table"][:30], expected)
    assert os.path.exists(work / "sasrec_p2rec" / "item_embeddings.npy")
    png = compare.plot_val_curves([res], str(work / "val_curves.png"))  # base vs augmented, from metrics.jsonl
    assert open(png, "rb").read(4) == b"\x89PNG"
    table = (work / "comparison.md").read_text()
    assert "SASRec + P2Rec (pca, add)" in table and table.count("\n") == 4
    assert 0.0 < res["p2rec"]["info"]["explained_variance"] <= 1.0 + 1e-6
    assert res["p2rec"]["info"]["reconstruct_prior_temperature"] == pytest.approx(
        json.load(open(root / "p2rec_reconstruct-custom" / "results.json"))["prior_temperature"])

    # `recommend` serves the run through its augmented SASRec: its top candidate hits exactly where the
    # augmentation's own test evaluation says it does.
    from rsllm_jax.recommend import Recommender

    (work / "config.json").write_text(c.to_json_best_effort())  # what main writes beside every run
    rec = Recommender.load(str(work))
    hits = [rec.recommend(r["history"], r["candidates"], top_k=1)["ranking"][0]["item"] == r["target"]
            for r in rec.split.test]
    assert hits == [bool(h) for h in saved["p2rec"]["test"]["per_row"]["hit1"]]


def test_item_embeddings_are_cached_and_reused(reconstructed, monkeypatch):
    root, llm, _, _ = reconstructed
    c = _data(tiny.get_p2rec_config("p2rec_augment"), root)
    c.p2rec.reconstruct_dir = str(root / "p2rec_reconstruct-custom")
    work = str(root / "cache_check")
    titles = _split(c).titles
    calls = []

    def fake_llm(cfg, titles, lora, *, llm=None):  # stands in for the LLM forward: counts the calls
        calls.append(sorted(lora))
        return np.full((len(titles), 4), len(calls), np.float32)

    monkeypatch.setattr(augment, "embed_items_with_llm", fake_llm)
    first, info1 = augment.item_embeddings_cached(c, work, titles, llm=llm)
    second, info2 = augment.item_embeddings_cached(c, work, titles, llm=llm)
    assert len(calls) == 1 and calls[0] == ["llm"]  # the LoRA subtree only, not the head
    assert not info1["reused"] and info2["reused"] and np.array_equal(first, second)
    c.p2rec.item_prompt = "Title: {title}."  # another prompt -> other embeddings
    third, info3 = augment.item_embeddings_cached(c, work, titles, llm=llm)
    assert len(calls) == 2 and not info3["reused"] and third[0, 0] == 2
    c.p2rec.reconstruct_dir = augment.NO_RECONSTRUCTION  # the ablation: the pretrained LLM, no LoRA
    fourth, info4 = augment.item_embeddings_cached(c, work, titles, llm=llm)
    assert len(calls) == 3 and calls[-1] == [] and not info4["reused"] and fourth[0, 0] == 3
    assert info4["reconstruct_dir"] == "none" and info4["reconstruct_step"] == -1


def test_pooled_metrics_weight_by_rows():
    val = dict(n=3, hr1_cand=1 / 3, hr10=None, ndcg10=0.3, cold=dict(n=0, hr1_cand=None, hr10=None, ndcg10=None))
    test = dict(n=1, hr1_cand=1.0, hr10=0.0, ndcg10=0.7, cold=dict(n=1, hr1_cand=1.0, hr10=0.0, ndcg10=0.7))
    both = compare.pooled(val, test)
    assert both["n"] == 4 and both["hr1_cand"] == pytest.approx(0.5)  # 2 hits of 4 rows
    assert both["ndcg10"] == pytest.approx((0.9 + 0.7) / 4) and both["hr10"] == 0.0  # None parts are skipped
    assert both["cold"] == dict(n=1, hr1_cand=1.0, hr10=0.0, ndcg10=0.7)


def test_sign_test_counts_discordant_rows():
    won, lost, p = compare.sign_test([1, 0, 0, 1, 0, 0], [1, 1, 1, 0, 1, 0])
    assert (won, lost) == (3, 1) and p == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert compare.sign_test([1, 0], [1, 0]) == (0, 0, 1.0)
    assert compare.sign_test([0] * 10, [1] * 10)[2] == pytest.approx(2 / 2 ** 10)
    with pytest.raises(ValueError, match="same rows"):
        compare.sign_test([1], [1, 0])


def test_compare_table_lists_base_once():
    r = dict(dataset="ml", base=dict(info=dict(run_dir="x"), test=dict(n=2, hr1_cand=0.5, hr10=1.0, ndcg10=0.3,
                                                                        cold=dict(n=0, hr1_cand=None))),
             p2rec=dict(info=dict(reduce="pca", mode="add"), test=dict(n=2, hr1_cand=1.0, hr10=1.0, ndcg10=0.5,
                                                                       cold=dict(n=1, hr1_cand=1.0, hr10=1.0,
                                                                                 ndcg10=0.5))))
    r2 = dict(r, p2rec=dict(r["p2rec"], info=dict(reduce="pca", mode="init")))
    r3 = dict(r, p2rec=dict(r["p2rec"], info=dict(reduce="pca", mode="init", llm="pretrained")))
    table = compare.markdown_table([r, r2, r3])
    assert table.count("| ml | SASRec |") == 1 and "(pca, add)" in table and "(pca, init)" in table
    assert "(pca, init, pretrained LLM)" in table
    assert "| ml | mine |" in compare.markdown_table([dict(r, label="mine")])
    assert "| 0.5000 |" in table and "| - |" in table


def test_main_dispatches_the_p2rec_stages(tmp_path):
    inter, items = write_custom_dataset(tmp_path / "data")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "rsllm_jax.main", "--config=configs/p2rec_reconstruct.py", f"--workdir={tmp_path}/run",
         "--config.data.dataset=custom", f"--config.data.custom_interactions={inter}",
         f"--config.data.custom_items={items}", f"--config.data.cache_dir={tmp_path}/cache",
         "--config.p2rec.build_missing=False", f"--config.p2rec.sasrec_dir={tmp_path}/missing"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "config.p2rec.sasrec_dir" in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------- helpers
def _split(c):
    from rsllm_jax.data.splits import load_split_from_config

    return load_split_from_config(c.data)


def test_augment_keeps_the_sasrec_logging_cadence():
    """Logging every step is for the ~25-step reconstruction; the augmented SASRec trains ~20k steps."""
    from configs import base, p2rec_common

    assert p2rec_common.get_config("p2rec_reconstruct").log_every_steps == 1
    assert p2rec_common.get_config("p2rec_augment").log_every_steps == base.get_config().log_every_steps
