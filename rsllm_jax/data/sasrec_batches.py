"""Split records -> SASRec arrays (spec §2), as Grain transforms.

Layout (L = max_len, pad id = num_items, oldest item left, newest right):
    history [a, b, c], target d, L = 5
    seq = [P, P, a, b, c]    the input sequence, left-padded
    pos = [P, P, b, c, d]    what each position must predict: the next item (seq[t+1]); the last
                             position predicts the record's target (SASRec/LLaRA trains on every
                             position, not only the last)
    neg = [P, P, x, y, z]    one sampled negative per real position (never in the window, distinct),
                             drawn per global batch (`SasrecNegatives` after batching, vectorised)
Eval records also give `target` and the frozen `candidates` (scored by logits at the last position).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np



def left_pad(items: Sequence[int], length: int, pad_id: int) -> np.ndarray:
    """The last `length` items, left-padded with `pad_id`, as int32."""
    items = list(items)[-length:] if length else []
    return np.asarray([pad_id] * (length - len(items)) + items, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class SasrecWindows(grain.transforms.Map):
    """record -> {seq, pos} int32 [max_len]: the input window and its next-item targets."""
    num_items: int
    max_len: int = 10

    def map(self, record: dict) -> dict[str, np.ndarray]:
        history = list(record["history"])[-self.max_len:]
        return {"seq": left_pad(history, self.max_len, self.num_items),
                "pos": left_pad(history[1:] + [int(record["target"])], self.max_len, self.num_items)}


def sample_window_negatives(rng: np.random.Generator, seq: np.ndarray, pos: np.ndarray, num_items: int,
                            max_rounds: int = 8) -> np.ndarray:
    """neg [B, L]: for every real position (pos != pad) of each row, an item drawn uniformly from the
    catalogue minus that row's window (seq and pos: the history the model sees and the target), distinct
    within the row; padding positions get the pad id.

    Vectorised rejection sampling (a Python loop per example made the input pipeline, not the model, the
    bottleneck of SASRec training). Rows still short after `max_rounds` rounds (tiny catalogues) fall back
    to an exact draw from the allowed items."""
    pad = num_items
    batch, length = pos.shape
    need = (pos != pad).sum(1)
    window = np.concatenate([seq, pos], axis=1)  # [B, 2L]; pad never matches a drawn item
    neg = np.full((batch, length), pad, np.int32)
    todo = np.flatnonzero(need > 0)
    draws = 2 * length + 8
    earlier = np.tril(np.ones((draws, draws), bool), k=-1)  # [i, j]: j is an earlier draw than i
    for _ in range(max_rounds):
        if not len(todo):
            break
        cand = rng.integers(0, num_items, size=(len(todo), draws))
        in_window = (cand[:, :, None] == window[todo][:, None, :]).any(-1)
        repeated = ((cand[:, :, None] == cand[:, None, :]) & earlier).any(-1)
        ok = ~in_window & ~repeated
        k = need[todo]
        rank = np.cumsum(ok, axis=1)  # 1-based rank of each acceptable draw in its row
        enough = rank[:, -1] >= k
        r, c = np.nonzero(ok & (rank <= k[:, None]) & enough[:, None])  # the first k acceptable draws
        neg[todo[r], length - k[r] + rank[r, c] - 1] = cand[r, c]  # right-aligned with the real positions
        todo = todo[~enough]
    for row in todo:
        allowed = np.setdiff1d(np.arange(num_items), window[row])
        k = need[row]
        if k > len(allowed):
            raise ValueError(f"cannot draw {k} negatives: only {len(allowed)} items are outside the window "
                             f"{window[row][window[row] != pad].tolist()} (catalogue of {num_items})")
        neg[row, length - k:] = rng.choice(allowed, size=k, replace=False)
    return neg


@dataclasses.dataclass(frozen=True)
class SasrecNegatives(grain.transforms.RandomMap):
    """Batch-level: {seq, pos} [B, L] -> adds neg [B, L] (`sample_window_negatives`), redrawn every epoch."""
    num_items: int

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**batch, "neg": sample_window_negatives(rng, batch["seq"], batch["pos"], self.num_items)}


@dataclasses.dataclass(frozen=True)
class SasrecEvalTransform(grain.transforms.Map):
    """record -> {seq int32 [max_len], target int32 [], candidates int32 [num_candidates]}."""
    num_items: int
    max_len: int = 10
    num_candidates: int = 20

    def map(self, record: dict) -> dict[str, np.ndarray]:
        candidates = np.asarray(record["candidates"], dtype=np.int32)
        if candidates.shape != (self.num_candidates,):
            raise ValueError(f"record for user {record.get('user')!r} has {candidates.shape[0]} "
                             f"candidates, expected {self.num_candidates}")
        return {"seq": left_pad(record["history"], self.max_len, self.num_items),
                "target": np.int32(record["target"]), "candidates": candidates}
