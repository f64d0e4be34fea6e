"""LLaRA's generation protocol (spec §6): which candidates an answer names, and the three ratios.

Greedy output, first line only. A candidate is named if its lower-cased title is a substring of the
lower-cased answer. ValidRatio = answers naming exactly one candidate / all; HitRatio@1 = answers
whose single named candidate is the target / valid answers; accuracy = hits / all.
"""
from __future__ import annotations

from collections.abc import Sequence


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def named_candidates(answer: str, candidate_titles: Sequence[str]) -> list[int]:
    """Indices of the candidates whose title occurs in the answer's first line (case-insensitive)."""
    line = first_line(answer).lower()
    return [i for i, title in enumerate(candidate_titles) if title.strip().lower() in line]


def score_answer(answer: str, candidate_titles: Sequence[str], target_index: int) -> dict:
    named = named_candidates(answer, candidate_titles)
    valid = len(named) == 1
    return {"named": named, "valid": valid, "hit": valid and named[0] == target_index}


def aggregate(scored: Sequence[dict]) -> dict:
    n = len(scored)
    valid = sum(s["valid"] for s in scored)
    hits = sum(s["hit"] for s in scored)
    return {
        "n": n,
        "valid_ratio": valid / n if n else float("nan"),
        "hit_ratio_at_1": hits / valid if valid else 0.0,
        "accuracy": hits / n if n else float("nan"),
    }
