"""The LLaRA protocol's matching rules on hand-made answers."""
from rsllm_jax.eval.generation_metrics import aggregate, first_line, named_candidates, score_answer

TITLES = ["Star Wars", "Alien", "Aliens", "Heat", "The Matrix"]


def test_substring_match_is_case_insensitive_and_first_line_only():
    assert named_candidates("i'd watch STAR WARS tonight", TITLES) == [0]
    assert named_candidates("Heat\nStar Wars", TITLES) == [3]
    assert first_line("  Heat\nmore") == "Heat"


def test_zero_one_many_matches():
    assert score_answer("nothing here", TITLES, 0) == {"named": [], "valid": False, "hit": False}
    assert score_answer("The Matrix", TITLES, 4) == {"named": [4], "valid": True, "hit": True}
    assert score_answer("The Matrix", TITLES, 1) == {"named": [4], "valid": True, "hit": False}
    # "Aliens" contains "Alien": two candidates named -> invalid, as in LLaRA's evaluation.
    assert score_answer("Aliens", TITLES, 2)["named"] == [1, 2]
    assert not score_answer("Aliens", TITLES, 2)["valid"]


def test_aggregate_ratios():
    scored = [score_answer(a, TITLES, t) for a, t in
              [("Heat", 3), ("Heat", 0), ("Aliens", 2), ("The Matrix", 4), ("nope", 1)]]
    m = aggregate(scored)
    assert m["n"] == 5
    assert m["valid_ratio"] == 3 / 5
    assert m["hit_ratio_at_1"] == 2 / 3
    assert m["accuracy"] == 2 / 5
