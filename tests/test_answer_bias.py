"""eval.answer_bias: position and popularity statistics of an LLM row's answers."""
import json

import numpy as np
import pytest

from rsllm_jax.eval import answer_bias

K = 4


def _records(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cands = [int(c) for c in rng.permutation(10)[:K]]
        out.append(dict(history=[], candidates=cands, target=cands[int(rng.integers(K))]))
    return out


def _pred(row, rec, position):
    return dict(row=row, hit=rec["candidates"][position] == rec["target"], named_positions=[position],
                named_items=[rec["candidates"][position]], target_position=rec["candidates"].index(rec["target"]),
                target_item=rec["target"])


def test_always_first_position_is_flagged():
    records = _records()
    counts = np.arange(10)  # item i has i training interactions
    preds = [_pred(i, r, 0) for i, r in enumerate(records)]
    preds.append(dict(row=0, hit=False, named_positions=[0, 1], named_items=[], target_position=0, target_item=0))
    rep = answer_bias.answer_bias(preds, records, counts)
    assert rep["n"] == 41 and rep["valid"] == 40
    assert rep["top_position"] == 1 and rep["top_position_share"] == 1.0 and rep["position_uniform_p"] < 1e-6
    assert sum(rep["target_position_counts"]) == 40
    hits = np.mean([r["candidates"][0] == r["target"] for r in records])
    assert rep["hit_ratio_at_1"] == pytest.approx(hits)


def test_popularity_percentile_and_most_popular_rule():
    records = _records()
    counts = np.arange(10)
    # Naming the most popular candidate: percentile 1 for every row; its HR@1 is the rule's.
    preds = [_pred(i, r, int(np.argmax(counts[r["candidates"]]))) for i, r in enumerate(records)]
    rep = answer_bias.answer_bias(preds, records, counts)
    assert rep["named_popularity_pct"] == 1.0
    assert rep["hit_ratio_at_1"] == pytest.approx(answer_bias.most_popular_hr1(records, counts))
    assert rep["most_popular_hr1_same_rows"] == pytest.approx(rep["hit_ratio_at_1"])
    # Ties count half; the least popular of distinct counts is 0.
    assert answer_bias.popularity_percentile(np.array([1, 1, 1, 1]), [0, 1, 2, 3], 0) == 0.5
    assert answer_bias.popularity_percentile(counts, [0, 5, 7, 9], 0) == 0.0


def test_predictions_without_positions_get_an_actionable_error(tmp_path):
    path = tmp_path / "predictions_test.jsonl"
    path.write_text(json.dumps(dict(row=0, output="x", matched=[], hit=False)) + "\n")
    with pytest.raises(ValueError, match="named_positions"):
        answer_bias.read_predictions(str(path))
