"""`recommend` on a tiny trained stage-2 run: the same scores the evaluator writes for the same rows."""
import json
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "soak"))
from soak import REPO, _env, setup  # noqa: E402  (the soak's tiny dataset, LLM and SASRec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    cmd = setup(root)["stage2"] + ["--config.prompts.candidate_order=sasrec", "--config.train.max_train_samples=32"]
    run = root / "stage2"
    subprocess.run(cmd + [f"--workdir={run}"], check=True, env=_env(), cwd=REPO, capture_output=True)
    # The evaluator's own likelihood readout on the test rows, in a separate process.
    ev = [a for a in cmd if not a.startswith(("--config=", "--config.train.", "--config.stage2.stage1_dir"))]
    ev = [ev[0], ev[1], ev[2], "--config=configs/tiny.py:eval", *ev[3:], f"--config.checkpoint={run}",
          "--config.eval.generate=False", "--config.eval.score_candidates=True", "--config.eval.grounded=True",
          "--config.eval.two_tower=False", "--config.eval.max_rows=4", f"--workdir={root / 'eval'}"]
    subprocess.run(ev, check=True, env=_env(), cwd=REPO, capture_output=True)
    preds = [json.loads(line) for line in open(root / "eval" / "predictions_test.jsonl")]
    return run, preds, root / "sasrec-base"


def test_recommend_scores_a_test_row_as_the_evaluator_does(trained, monkeypatch):
    from rsllm_jax.recommend import Recommender, RequestError, format_table

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    run, preds, _ = trained
    rec = Recommender.load(str(run))
    by_user = {str(r["user"]): r for r in rec.split.test}
    for p in preds:
        row = by_user[str(p["user"])]
        out = rec.recommend(row["history"], row["candidates"], top_k=len(row["candidates"]))
        got = {r["item"]: r["likelihood"] for r in out["ranking"]}
        np.testing.assert_allclose([got[c] for c in p["candidates"]], p["likelihood_scores"], rtol=1e-4, atol=1e-4)
        assert out["grounded"]["item"] == p["candidates"][p["grounded_position"]]
        assert [r["rank"] for r in out["ranking"]] == list(range(1, len(got) + 1))
        assert all(a["likelihood"] >= b["likelihood"] for a, b in zip(out["ranking"], out["ranking"][1:]))
    # Titles work like ids; an unknown title names the closest ones.
    row = rec.split.test[0]
    by_title = rec.recommend([rec.split.titles[i] for i in row["history"]], row["candidates"], top_k=3)
    assert [r["item"] for r in by_title["ranking"]] == [r["item"] for r in rec.recommend(
        row["history"], row["candidates"], top_k=3)["ranking"]]
    title = rec.split.titles[row["history"][0]]
    with pytest.raises(RequestError, match=f"no item titled {title[:-1]!r}.*closest: .*{title}"):
        rec.recommend([title[:-1]], row["candidates"])
    # The whole catalogue: SASRec's shortlist outside the history, re-ranked by the LLM.
    cat = rec.recommend(row["history"], catalogue=True, shortlist=5, top_k=5)
    assert len(cat["ranking"]) == 5 and not {r["item"] for r in cat["ranking"]} & set(row["history"])
    assert "grounded answer" in format_table(cat)
    # A batch of requests: one pass, the same answers as one by one.
    rows = rec.split.test[:3]
    batch = rec.recommend_batch([dict(history=r["history"], candidates=r["candidates"]) for r in rows], top_k=4)
    for r, b in zip(rows, batch):
        one = rec.recommend(r["history"], r["candidates"], top_k=4)
        assert [x["item"] for x in b["ranking"]] == [x["item"] for x in one["ranking"]]
        np.testing.assert_allclose([x["likelihood"] for x in b["ranking"]], [x["likelihood"] for x in one["ranking"]],
                                   rtol=1e-4, atol=1e-4)


def test_a_sasrec_run_serves_through_sasrec_with_the_trainers_user_states(trained, monkeypatch):
    from rsllm_jax.recommend import Recommender, RequestError, format_table

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    _, _, sasrec_run = trained
    rec = Recommender.load(str(sasrec_run))
    exported = np.load(sasrec_run / "user_states.npz")["test"]  # the trainer's own pass over the test rows
    for i, row in enumerate(rec.split.test[:4]):
        np.testing.assert_allclose(rec.user_state(row["history"]), exported[i], rtol=1e-4, atol=1e-5)
        out = rec.recommend(row["history"], row["candidates"], top_k=len(row["candidates"]))
        assert out["readout"] == "SASRec logit" and "grounded" not in out
        logits = [r["sasrec_logit"] for r in out["ranking"]]
        assert sorted(logits, reverse=True) == logits and {r["item"] for r in out["ranking"]} == set(row["candidates"])
        want = rec.sasrec[2][row["candidates"]] @ exported[i]
        np.testing.assert_allclose(sorted(logits, reverse=True), sorted(want, reverse=True), rtol=1e-4, atol=1e-4)
    assert "SASRec alone" in format_table(out)
    with pytest.raises(RequestError, match="SASRec alone"):
        rec.recommend(row["history"], row["candidates"], explain=True)


def test_explain_needs_a_chat_model_and_is_labelled_generated_text(trained, monkeypatch):
    from rsllm_jax.recommend import Recommender, RequestError, format_table

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    run, _, _ = trained
    rec = Recommender.load(str(run))
    row = rec.split.test[0]
    with pytest.raises(RequestError, match="chat template"):
        rec.recommend(row["history"], row["candidates"], explain=True)
    rec.built.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} Because"
    a = rec.recommend(row["history"], row["candidates"], top_k=3, explain=True)
    b = rec.recommend(row["history"], row["candidates"], top_k=3, explain=True)
    assert isinstance(a["explanation"]["text"], str) and "generated" in a["explanation"]["label"]
    assert a["explanation"] == b["explanation"]  # greedy: the same request, the same text
    assert f"why {a['ranking'][0]['title']}?" in format_table(a)
