"""The user-learning levers: SASRec's user states, the user slot, listwise distillation from SASRec."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rsllm_jax import losses
from rsllm_jax.data.prompt_pipeline import EvalExample, SasrecOrder, TrainExample
from rsllm_jax.data.prompts import PromptBuilder, PromptSettings, pad_batch
from rsllm_jax.data.splits import load_split_from_config
from rsllm_jax.checkpoint import user_states
from tiny_tokenizer import tiny_tokenizer

TITLES = ["Toy Story", "Heat", "Alien", "The Matrix", "Star Wars", "Fargo", "Casablanca", "The Thing"]
V = 1000


# ---- the distillation loss ---------------------------------------------------------------------

def _kl(q, p):
    return float(np.sum(q * (np.log(q) - np.log(p))))


def test_candidate_distill_is_the_kl_over_distinct_first_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    tokens = np.asarray([[3, 7, 9, 11], [3, 7, 3, 20]], np.int32)  # row 1: candidates 0 and 2 share token 3
    teacher = rng.normal(size=(2, 4)).astype(np.float32)
    got = float(losses.candidate_distill(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(teacher),
                                         temperature=0.5))
    want = []
    for b in range(2):
        q = np.exp(teacher[b] / 0.5) / np.exp(teacher[b] / 0.5).sum()
        groups = {}
        for k, t in enumerate(tokens[b]):
            groups[t] = groups.get(t, 0.0) + q[k]
        distinct = sorted(groups)
        s = logits[b, distinct]
        p = np.exp(s) / np.exp(s).sum()
        want.append(_kl(np.asarray([groups[t] for t in distinct]), p))
    assert got == pytest.approx(np.mean(want), rel=1e-5)


def test_candidate_distill_is_zero_at_the_teacher_and_trains_only_the_student():
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    teacher = jnp.asarray([[2.0, 0.0, -1.0]])
    logits = jnp.full((1, 8), -5.0).at[0, 1:4].set(teacher[0] / 2.0)
    assert float(losses.candidate_distill(logits, tokens, teacher, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    g_student, g_teacher = jax.grad(lambda l, t: losses.candidate_distill(l, tokens, t, temperature=1.0),
                                    argnums=(0, 1))(logits, teacher)
    assert float(jnp.abs(g_student).sum()) > 0 and float(jnp.abs(g_teacher).sum()) == 0.0
    # Invalid rows count for nothing.
    two = losses.candidate_distill(jnp.concatenate([logits, logits * 0]), jnp.concatenate([tokens, tokens]),
                                   jnp.concatenate([teacher, teacher]), temperature=2.0, valid=jnp.asarray([1, 0]))
    assert float(two) == pytest.approx(0.0, abs=1e-6)


# ---- the user slot in prompts and in the model ---------------------------------------------------

def _builder(**kw):
    return PromptBuilder(tiny_tokenizer(), TITLES, V, PromptSettings(domain="movie", **kw))


def test_user_slot_sits_after_the_history_and_only_in_unified_prompts():
    b = _builder(user_slot=True)
    ex = b.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    at = np.flatnonzero(ex["user_slot"])
    assert len(at) == 1 and ex["input_ids"][at[0]] == b.uid_id
    assert ex["history_mask"][at[0]] == 1 and ex["slot_items"][at[0]] == -1
    # After the last history item's ID slot, before the first candidate's.
    slots = np.flatnonzero(ex["slot_items"] >= 0)
    assert slots[2] < at[0] < slots[3]
    tok = tiny_tokenizer()
    assert tok.decode(ex["input_ids"][slots[2] + 1:at[0]]) == ", profile"
    text_only = b.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=False)
    assert not text_only["user_slot"].any() and b.uid_id not in text_only["input_ids"]
    # Without the setting the prompt is exactly the old one.
    plain = _builder().render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    assert "user_slot" not in plain
    keep = ex["user_slot"] == 0
    np.testing.assert_array_equal(np.delete(ex["input_ids"], np.arange(slots[2] + 1, at[0] + 1)), plain["input_ids"])
    assert keep.sum() == len(plain["input_ids"]) + len(ex["input_ids"]) - len(plain["input_ids"]) - 1


def test_examples_carry_the_user_state_and_the_candidates_first_tokens():
    b = _builder(user_slot=True)
    state = np.arange(4, dtype=np.float32)
    rec = dict(history=[0, 1, 2], target=4, user_state=state)
    ex = TrainExample({"m": b}, num_items={"m": len(TITLES)}, num_candidates=5, seed=0, batch_size=2,
                      use_ids=True, distill=True)(3, dict(rec, dataset="m"))
    np.testing.assert_array_equal(ex["user_state"], state)
    cands = ex["cand_items"].tolist()
    assert sorted(cands) == sorted(set(cands)) and 4 in cands and len(cands) == 5
    assert list(ex["slot_items"][ex["slot_items"] >= 0][3:]) == cands  # the prompt's candidate order
    assert ex["cand_first_token"].tolist() == [b.answer_ids(c)[0] for c in cands]
    batch = pad_batch([ex, ex], (384,))
    assert batch["user_state"].shape == (2, 4) and batch["user_slot"].shape == (2, 384)
    with pytest.raises(ValueError, match="user state"):
        EvalExample(b, template=0, use_ids=True)(0, dict(history=[0, 1, 2], target=4, candidates=[4, 5, 6]))


def test_sasrec_order_shows_candidates_best_first_and_changes_nothing_else():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(TITLES), 4)).astype(np.float32)
    state = rng.normal(size=4).astype(np.float32)
    order = SasrecOrder(table)
    rec = dict(history=[0, 1, 2], target=4, candidates=[3, 4, 5, 6, 7], user_state=state)
    shown = order(rec, rec["candidates"])
    scores = table[shown] @ state
    assert sorted(shown) == sorted(rec["candidates"]) and np.all(np.diff(scores) <= 0)
    b = _builder()
    ex = EvalExample(b, template=0, use_ids=True, order=order)(0, rec)
    plain = EvalExample(b, template=0, use_ids=True)(0, rec)
    assert list(ex["slot_items"][ex["slot_items"] >= 0][3:]) == shown
    assert list(plain["slot_items"][plain["slot_items"] >= 0][3:]) == rec["candidates"]
    assert ex["target_item"] == plain["target_item"] and rec["candidates"] == [3, 4, 5, 6, 7]  # record untouched
    t = TrainExample({"m": b}, num_items={"m": len(TITLES)}, num_candidates=5, seed=0, batch_size=2, use_ids=True,
                     order=order, distill=True)(3, dict(rec, dataset="m"))
    cands = t["cand_items"].tolist()
    assert np.all(np.diff(table[cands] @ state) <= 0) and 4 in cands
    with pytest.raises(ValueError, match="user state"):
        order(dict(history=[0], target=1), [1, 2])


def test_candidate_order_config_is_checked():
    from rsllm_jax.train.rsllm_trainer import candidate_order

    c = tiny.get_llm_config("stage2")
    assert candidate_order(c, np.zeros((3, 2))) is None
    c.prompts.candidate_order = "sasrec"
    assert isinstance(candidate_order(c, np.zeros((3, 2))), SasrecOrder)
    with pytest.raises(ValueError, match="stage-2 option"):
        candidate_order(c, None)
    c.prompts.candidate_order = "popularity"
    with pytest.raises(ValueError, match="candidate_order='popularity'"):
        candidate_order(c, np.zeros((3, 2)))


def test_model_writes_the_projected_user_state_at_the_user_slot_only():
    from rsllm_jax.models.rsllm import RSLLM, RSLLMConfig
    from tiny_llm import tiny_llm

    llm_cfg, llm_params, _ = tiny_llm()
    model = RSLLM(RSLLMConfig(llm=llm_cfg, num_added_tokens=2, num_items=6, rec_dim=4, user_slot=True))
    ids = jnp.asarray([[5, 6, llm_cfg.vocab_size + 2, 7]], jnp.int32)
    slots = jnp.full((1, 4), -1, jnp.int32)
    import flax.linen as nn

    params = nn.meta.unbox(model.init(jax.random.key(0), ids, jnp.ones_like(ids), slots)["params"])
    assert "user_projector" in params
    user_slot = jnp.asarray([[0, 0, 1, 0]], jnp.int32)
    states = [jnp.ones((1, 4)), -jnp.ones((1, 4))]
    embs = [model.apply({"params": params}, ids, slots, user_slot, s, method=RSLLM.embed) for s in states]
    want = model.apply({"params": params}, states[0], method=lambda m, s: m.user_projector(s))
    np.testing.assert_allclose(embs[0][0, 2], want[0], rtol=1e-6)
    np.testing.assert_array_equal(embs[0][0, [0, 1, 3]], embs[1][0, [0, 1, 3]])
    assert not np.allclose(embs[0][0, 2], embs[1][0, 2])
    # The teacher: SASRec's logits are the user state against the frozen item rows.
    scores = model.apply({"params": params}, states[0], jnp.asarray([[0, 3]]), method=RSLLM.sasrec_scores)
    table = params["rec"]["item_table"]
    np.testing.assert_allclose(scores[0], table[jnp.asarray([0, 3])] @ states[0][0], rtol=1e-6)


# ---- stage 0 exports the states, stage 2 trains with both levers ------------------------------------

def _data(c, tmp_path):
    from synthetic_data import write_custom_dataset

    inter, items = write_custom_dataset(tmp_path / "data")
    c.data.dataset = "custom"
    c.data.custom_interactions, c.data.custom_items = inter, items
    c.data.cache_dir = str(tmp_path / "cache")
    return c


def test_stage0_exports_states_and_stage2_trains_with_user_slot_and_distill(tmp_path, monkeypatch):
    from rsllm_jax.train.rsllm_trainer import run_eval, run_stage
    from rsllm_jax.train.sasrec_trainer import train_sasrec
    from tiny_llm import tiny_llm

    monkeypatch.chdir(tmp_path)
    c0 = _data(tiny.get_config(), tmp_path)
    train_sasrec(c0, str(tmp_path / "sasrec"))
    split = load_split_from_config(c0.data)
    user_states.attach(split, str(tmp_path / "sasrec"))
    # The exported state is SASRec's last-position output: its logits rank the candidates as stage 0 does.
    rec = split.test[0]
    table = np.load(tmp_path / "sasrec" / "item_embeddings.npy")
    assert rec["user_state"].shape == (c0.sasrec.hidden,)
    scores = table[rec["candidates"]] @ rec["user_state"]
    assert np.isfinite(scores).all() and scores.std() > 0
    # A state file from another split is refused, not silently paired with the wrong windows.
    other = load_split_from_config(c0.data)
    other.train = other.train[1:]
    with pytest.raises(ValueError, match="computed on another split"):
        user_states.attach(other, str(tmp_path / "sasrec"))

    llm = tiny_llm()
    c2 = _data(tiny.get_llm_config("stage2"), tmp_path)
    c2.stage2.sasrec_dir, c2.stage2.stage1_dir = "sasrec", "none"
    c2.prompts.user_slot, c2.prompts.candidate_order = True, "sasrec"
    c2.loss.weight_distill, c2.loss.distill_temperature = 0.5, 2.0
    r2 = run_stage(c2, str(tmp_path / "stage2"), llm=llm)
    rows = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "distill" in m]
    assert steps and all(np.isfinite(m["distill"]) and m["distill"] >= 0 for m in steps)
    assert "grad_norm/user_projector" in steps[0]
    assert 0.0 <= r2["test"]["accuracy"] <= 1.0
    # Evaluating the run dir reads the copied user states and reproduces the run's test numbers.
    ce = _data(tiny.get_llm_config("eval"), tmp_path)
    ce.checkpoint, ce.prompts.user_slot, ce.prompts.candidate_order = "stage2", True, "sasrec"
    ce.eval.grounded = True
    m = run_eval(ce, str(tmp_path / "eval"), llm=llm)
    assert m["accuracy"] == r2["test"]["accuracy"] and m["two_tower_hr1"] == r2["test"]["two_tower_hr1"]
    # Grounded answers name exactly one candidate each; their hits are what grounded_hr1 counts.
    split = load_split_from_config(ce.data)
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == m["n"]
    for p, rec in zip(preds, split.test):
        cand = rec["candidates"][p["grounded_position"]]
        assert p["grounded_output"].strip() == split.titles[cand].strip()
        assert p["grounded_hit"] == (cand == rec["target"])
    assert m["grounded_hr1"] == pytest.approx(np.mean([p["grounded_hit"] for p in preds]))


# ---- the paired comparison ------------------------------------------------------------------------

def test_paired_compare_pools_seeds_and_matches_rows_by_user(tmp_path):
    from rsllm_jax.eval import paired

    recs = [dict(user=str(u), history=[0, 1], target=2, candidates=[2, 3, 4]) for u in range(6)]

    def llm_run(name, hits, users=range(6)):
        d = tmp_path / name
        d.mkdir()
        (d / "predictions_test.jsonl").write_text(
            "".join(json.dumps(dict(row=i, user=str(u), hit=bool(h))) + "\n" for i, (u, h) in enumerate(zip(users, hits))))
        return str(d)

    a = llm_run("a", [1, 0, 0, 1, 0, 0])
    b = llm_run("b", [1, 1, 1, 0, 1, 0])
    r = paired.compare([a, a], [b, b], recs)
    assert (r["rows"], r["base_hits"], r["new_hits"], r["new_only"], r["base_only"]) == (12, 4, 8, 6, 2)
    assert r["p_value"] == pytest.approx(paired.sign_test([1, 0, 0, 1, 0, 0] * 2, [1, 1, 1, 0, 1, 0] * 2)[2])
    # A subset run is paired on the users it scored, whatever its row numbers.
    sub = llm_run("sub", [0, 1], users=[4, 1])
    assert paired.compare([a], [sub], recs)["rows"] == 2 and paired.compare([a], [sub], recs)["new_only"] == 1
    # A stage-0 run: SASRec's highest-logit candidate is its answer.
    s = tmp_path / "sasrec"
    s.mkdir()
    np.save(s / "item_embeddings.npy", np.eye(5, dtype=np.float32))
    states = np.zeros((6, 5), np.float32)
    states[:3, 2] = 1.0  # users 0-2 score the target highest
    states[3:, 4] = 1.0
    np.savez(s / user_states.FILENAME, test=states, test_checksum=np.asarray(user_states.histories_checksum(recs)))
    assert paired.sasrec_hits(str(s), recs) == {"0": 1, "1": 1, "2": 1, "3": 0, "4": 0, "5": 0}
    with pytest.raises(ValueError, match="pair them one to one"):
        paired.compare([a], [a, b], recs)


def test_paired_hits_files_stand_in_for_their_runs_and_are_refused_for_other_rows(tmp_path):
    from rsllm_jax.eval import paired
    from rsllm_jax.run_files import write_json_atomic

    recs = [dict(user=str(u), history=[0, 1], target=2, candidates=[2, 3, 4]) for u in range(4)]
    run = tmp_path / "exp" / "ranked_cf-s1"
    run.mkdir(parents=True)
    (run / "predictions_test.jsonl").write_text(
        "".join(json.dumps(dict(user=str(u), hit=h)) + "\n" for u, h in enumerate([True, False, True, True])))
    hits = paired.run_hits(str(run), recs)
    assert paired.hits_file_name(str(run)) == "ranked_cf-s1.json"
    assert paired.hits_file_name(f"{run}:grounded") == "ranked_cf-s1-grounded.json"
    f = tmp_path / "h.json"
    write_json_atomic(str(f), paired.hits_record(str(run), hits, "movielens", recs))
    # The file gives the same hits and the same comparison as the run it came from.
    assert paired.run_hits(str(f), recs) == hits == {"0": 1, "1": 0, "2": 1, "3": 1}
    assert paired.compare([str(run)], [str(f)], recs)["new_only"] == 0
    # Hits of other test rows (another split) are refused, naming the file and the field.
    other = [dict(r, history=[1, 0]) for r in recs]
    with pytest.raises(ValueError, match=r"h\.json: field 'test_checksum'"):
        paired.run_hits(str(f), other)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(format=paired.HITS_FORMAT, hits={"0": 2})))
    with pytest.raises(ValueError, match=r"bad\.json: field 'hits'"):
        paired.run_hits(str(bad), recs)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a readable hits file"):
        paired.run_hits(str(bad), recs)


def test_paired_reads_the_popular_rule_and_an_llm_runs_other_readouts(tmp_path):
    from types import SimpleNamespace

    from rsllm_jax.eval import paired

    recs = [dict(user=str(u), history=[0, 1], target=2 + u % 3, candidates=[2, 3, 4]) for u in range(6)]
    train = [dict(user="t", history=[3, 3, 3], target=3), dict(user="t2", history=[3, 2], target=4)]
    split = SimpleNamespace(train=train, num_items=5)
    # Item 3 has the most training interactions (users t and t2): hits where the target is 3.
    assert paired.run_hits("popular", recs, split) == {str(u): int(u % 3 == 1) for u in range(6)}
    d = tmp_path / "run"
    (d / "likelihood").mkdir(parents=True)
    (d / "likelihood" / "predictions_test.jsonl").write_text("".join(
        json.dumps(dict(user=str(u), grounded_hit=u < 2, likelihood_target_rank=1 + u % 2)) + "\n" for u in range(6)))
    assert paired.run_hits(f"{d}:grounded", recs) == {str(u): int(u < 2) for u in range(6)}
    assert paired.run_hits(f"{d}:likelihood", recs) == {str(u): int(u % 2 == 0) for u in range(6)}
    r = paired.compare(["popular"], [f"{d}:grounded"], recs, split)
    assert (r["base_hits"], r["new_hits"], r["new_only"], r["base_only"]) == (2, 2, 1, 1)
    (d / "likelihood" / "predictions_test.jsonl").write_text(json.dumps(dict(user="0", hit=True)) + "\n")
    with pytest.raises(ValueError, match="grounded_hit"):
        paired.run_hits(f"{d}:grounded", recs)


# ---- the fusion readout ---------------------------------------------------------------------------

def test_gate_answers_with_the_llm_only_where_its_margin_clears_the_threshold():
    from rsllm_jax.eval import fusion

    # Row 0: the LM is sure of candidate 2 (large margin); row 1: it barely prefers candidate 1.
    # SASRec prefers candidate 0 on both rows.
    ll = np.asarray([[-3.0, -2.9, 0.0], [-1.0, -0.99, -1.01]])
    logits = np.asarray([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    m = fusion.margin(ll)
    assert m[0] > m[1] > 0
    assert list(fusion.gated_top(ll, logits, -np.inf)) == [2, 1]  # the LM everywhere
    assert list(fusion.gated_top(ll, logits, np.inf)) == [0, 0]  # SASRec everywhere
    assert list(fusion.gated_top(ll, logits, (m[0] + m[1]) / 2)) == [2, 0]  # the LM only where it is sure
    taus = fusion.gate_thresholds(np.asarray([0.1, 0.2, 0.3, 0.4]), shares=(1.0, 0.5, 0.0))
    assert taus[0] == -np.inf and taus[2] == np.inf
    assert (np.asarray([0.1, 0.2, 0.3, 0.4]) >= taus[1]).sum() == 2  # half the rows answered by the LM


def test_fusion_weight_is_chosen_on_val_and_its_ends_are_the_two_readouts(tmp_path):
    from types import SimpleNamespace

    from rsllm_jax.eval import fusion
    from rsllm_jax.checkpoint import user_states

    # 3 candidates per row (items 0-2), target item 0. The LM prefers item 1 slightly everywhere;
    # SASRec prefers the target strongly on val rows and on test rows 0-1, item 2 on test row 2.
    def recs(users):
        return [dict(user=str(u), history=[u % 3, 1], target=0, candidates=[0, 1, 2]) for u in users]
    split = SimpleNamespace(val=recs(range(3)), test=recs(range(10, 13)))
    table = np.eye(3, dtype=np.float32)
    sas = tmp_path / "sasrec"
    sas.mkdir()
    np.save(sas / "item_embeddings.npy", table)
    val_states = np.tile([3.0, 0.0, 0.0], (3, 1))
    test_states = np.asarray([[3.0, 0, 0], [3.0, 0, 0], [0, 0, 3.0]])
    np.savez(sas / user_states.FILENAME, val=val_states, val_checksum=np.asarray(user_states.histories_checksum(split.val)),
             test=test_states, test_checksum=np.asarray(user_states.histories_checksum(split.test)))
    run = tmp_path / "run"
    for name, sub in fusion.SPLIT_DIRS.items():
        (run / sub).mkdir(parents=True)
        (run / sub / f"predictions_{name}.jsonl").write_text("".join(
            json.dumps(dict(user=r["user"], candidates=r["candidates"], likelihood_scores=[-1.1, -1.0, -1.2])) + "\n"
            for r in getattr(split, name)))
    r = fusion.evaluate(str(run), str(sas), split)
    hr_val, hr_test = dict(zip(r["weights"], r["val_hr1"])), dict(zip(r["weights"], r["test_hr1"]))
    assert hr_val["0.0"] == 0.0 and hr_test["0.0"] == 0.0  # the LM alone: item 1, never the target
    assert hr_test["inf"] == pytest.approx(2 / 3)  # SASRec alone
    # Val is perfect from the first weight at which SASRec outvotes the LM; that smallest one is chosen.
    first = next(w for w in r["weights"] if hr_val[w] == 1.0)
    assert r["chosen_weight"] == first and first not in ("0.0", "inf")
    assert r["test_hits"] == {"10": 1, "11": 1, "12": 0} and r["test_hr1_at_chosen"] == pytest.approx(2 / 3)
    # The gate: answering every row is the LM alone, answering none is SASRec alone; val picks the share.
    g_val, g_test = dict(zip(r["gate_shares"], r["gate_val_hr1"])), dict(zip(r["gate_shares"], r["gate_test_hr1"]))
    assert g_test[1.0] == hr_test["0.0"] and g_test[0.0] == hr_test["inf"] and g_val[0.0] == 1.0
    assert g_val[r["gate_share"]] == max(g_val.values()) and r["gate_share"] == 0.0
    assert r["gate_test_hits"] == {"10": 1, "11": 1, "12": 0}
    # A predictions file without every candidate's score is refused, naming file and line.
    (run / "likelihood" / "predictions_test.jsonl").write_text(json.dumps(dict(user="10", likelihood_target_rank=1)) + "\n")
    with pytest.raises(ValueError, match=r"predictions_test\.jsonl:1: no 'likelihood_scores'"):
        fusion.evaluate(str(run), str(sas), split)
