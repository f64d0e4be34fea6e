"""The listwise candidate loss: candidate answers packed after the target's in one training row."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rsllm_jax import losses
from rsllm_jax.data.prompt_pipeline import TrainExample
from rsllm_jax.data.prompts import PromptBuilder, PromptSettings, pad_batch
from rsllm_jax.models.rsllm import RSLLM, RSLLMConfig
from tiny_llm import tiny_llm

TITLES = ["Toy Story", "Heat", "Alien", "The Matrix", "Star Wars", "Fargo", "Casablanca", "The Thing"]


def _setup():
    llm_cfg, llm_params, tok = tiny_llm()
    builder = PromptBuilder(tok, TITLES, llm_cfg.vocab_size, PromptSettings(domain="movie"))
    model = RSLLM(RSLLMConfig(llm=llm_cfg, num_added_tokens=2, num_items=len(TITLES), rec_dim=4))
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(1), ids, jnp.ones_like(ids), ids - 1)["params"])
    params["llm"] = llm_params
    return builder, model, params


def _forward(model, params, batch):
    return model.apply({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()}, method=RSLLM.towers)


def test_packed_answers_change_nothing_unpacked_and_score_each_candidate_as_the_answer():
    builder, model, params = _setup()
    history, cands, target = [0, 1, 2], [5, 3, 4, 6, 7], 4
    plain = builder.render(history, cands, target, template=0, use_ids=True)
    plain.update(builder.render_target(target, True))
    packed = builder.pack_answers(plain, target, [5, 3, 6], answer_tokens=3)
    n = len(plain["input_ids"])
    np.testing.assert_array_equal(packed["input_ids"][:n], plain["input_ids"])
    assert packed["loss_mask"].sum() == plain["loss_mask"].sum()  # NIP stays on the target's answer
    assert packed["lw_mask"].shape == (4, 3) and packed["lw_valid"].tolist() == [1, 1, 1, 1]

    out_plain = _forward(model, params, pad_batch([plain], (256,)))
    out = _forward(model, params, pad_batch([packed], (256,)))
    # The prompt and the target's answer see exactly what they saw unpacked: towers and NIP logits agree.
    for key in ("v_user", "v_target_given_user", "v_target"):
        np.testing.assert_allclose(out[key], out_plain[key], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out["logits"][0, :n], out_plain["logits"][0, :n], rtol=2e-5, atol=2e-5)

    # Each candidate's score is its mean log-likelihood over its first 3 answer tokens, exactly as if it
    # were the only answer after the prompt (teacher forcing on an unpacked row).
    scores = np.asarray(out["candidate_scores"][0])
    for c, item in enumerate([target, 5, 3, 6]):
        alone = builder.render(history, cands, item, template=0, use_ids=True)
        logits = _forward(model, params, dict(pad_batch([dict(alone, **builder.render_target(item, True))], (256,))))
        logp = jax.nn.log_softmax(logits["logits"][0], axis=-1)
        start = int(np.argmax(alone["answer_mask"]))
        ids = builder.answer_ids(item)[:3]
        want = np.mean([float(logp[start - 1 + j, t]) for j, t in enumerate(ids)])
        assert scores[c] == pytest.approx(want, abs=2e-5)
    # Without segment ids the packed answers would read each other: the scores change.
    mixed = dict(pad_batch([packed], (256,)))
    mixed["segment_ids"] = np.zeros_like(mixed["segment_ids"])
    assert not np.allclose(np.asarray(_forward(model, params, mixed)["candidate_scores"][0]), scores, atol=1e-4)


def test_a_negative_with_the_targets_answer_is_masked_and_too_long_rows_are_refused():
    builder, _, _ = _setup()
    titles = TITLES + ["Heat"]  # item 8 has item 1's title
    b = PromptBuilder(builder.tok, titles, builder.iid_id, PromptSettings(domain="movie", buckets=(192,)))
    ex = b.render([0, 2], [1, 8, 3], 1, template=0, use_ids=True)
    packed = b.pack_answers(ex, 1, [8, 3], answer_tokens=4)
    assert packed["lw_valid"].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="listwise_negatives"):
        b.pack_answers(ex, 1, [8, 3, 4, 5, 6, 7, 0, 2] * 3, answer_tokens=16)


def test_listwise_softmax_is_the_cross_entropy_towards_the_target_column():
    s = np.asarray([[-1.0, -2.0, -0.5], [-0.2, -3.0, -4.0]], np.float32)
    loss, top1 = losses.listwise_softmax(jnp.asarray(s), temperature=0.5)
    want = np.mean([np.log(np.exp(r / 0.5).sum()) - r[0] / 0.5 for r in s])
    assert float(loss) == pytest.approx(want, rel=1e-5) and float(top1) == pytest.approx(0.5)
    # A masked negative and a padding row count for nothing.
    loss2, top2 = losses.listwise_softmax(jnp.asarray(s), temperature=0.5, candidate_valid=jnp.asarray([[1, 1, 0], [1, 1, 1]]),
                                          valid=jnp.asarray([1, 0]))
    assert float(loss2) == pytest.approx(np.log(np.exp(s[0, :2] / 0.5).sum()) - s[0, 0] / 0.5, rel=1e-5)
    assert float(top2) == 1.0
    g = jax.grad(lambda x: losses.listwise_softmax(x, temperature=1.0)[0])(jnp.asarray(s))
    assert float(g[0, 0]) < 0 and float(g[0, 1]) > 0  # raises the target, lowers the negatives


def test_training_examples_pack_the_hardest_shown_negatives():
    builder, _, _ = _setup()
    rng = np.random.default_rng(0)
    from rsllm_jax.data.prompt_pipeline import SasrecOrder

    table = rng.normal(size=(len(TITLES), 4)).astype(np.float32)
    order = SasrecOrder(table)
    rec = dict(history=[0, 1, 2], target=4, user_state=rng.normal(size=4).astype(np.float32), dataset="m")
    ex = TrainExample({"m": builder}, num_items={"m": len(TITLES)}, num_candidates=5, seed=0, batch_size=2,
                      use_ids=True, order=order, distill=True, listwise=(2, 4))(3, rec)
    shown = ex["cand_items"].tolist()
    negatives = [c for c in shown if c != 4][:2]
    want = [builder.answer_ids(c)[:4] for c in [4, *negatives]]
    got = [ex["lw_label"][c][ex["lw_mask"][c] > 0].tolist() for c in range(3)]
    assert got == want
    batch = pad_batch([ex, ex], (384,))
    assert batch["segment_ids"].shape == (2, 384) and batch["lw_pred"].shape == (2, 3, 4)


def test_stage2_trains_with_the_listwise_loss(tmp_path, monkeypatch):
    from synthetic_data import write_custom_dataset
    from rsllm_jax.train.rsllm_trainer import run_stage
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    monkeypatch.chdir(tmp_path)

    def data(c):
        inter, items = write_custom_dataset(tmp_path / "data")
        c.data.dataset, c.data.custom_interactions, c.data.custom_items = "custom", inter, items
        c.data.cache_dir = str(tmp_path / "cache")
        return c

    train_sasrec(data(tiny.get_config()), str(tmp_path / "sasrec"))
    c2 = data(tiny.get_llm_config("stage2"))
    c2.stage2.sasrec_dir, c2.stage2.stage1_dir = "sasrec", "none"
    c2.prompts.candidate_order = "sasrec"
    c2.loss.weight_listwise, c2.loss.listwise_negatives, c2.loss.listwise_answer_tokens = 1.0, 3, 8
    r2 = run_stage(c2, str(tmp_path / "stage2"), llm=tiny_llm())
    rows = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "listwise" in m]
    # Chance for 1 + 3 candidates is ln 4; the loss is a finite cross-entropy and top-1 a share.
    assert steps and all(np.isfinite(m["listwise"]) and m["listwise"] > 0 for m in steps)
    assert all(0.0 <= m["listwise_top1"] <= 1.0 for m in steps)
    assert 0.0 <= r2["test"]["accuracy"] <= 1.0
    c2.loss.listwise_negatives = 0
    with pytest.raises(ValueError, match="listwise_negatives >= 1"):
        run_stage(c2, str(tmp_path / "bad"), llm=tiny_llm())
