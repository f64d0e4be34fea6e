"""Split records -> SASRec arrays (spec §2), as Grain transforms.

Layout (L = max_len, pad id = num_items, oldest item left, newest right):
    history [a, b, c], target d, L = 5
    seq = [P, P, a, b, c]    the input sequence, left-padded
    pos = [P, P, b, c, d]    what each position must predict: the next item (seq[t+1]); the last
                             position predicts the record's target (SASRec/LLaRA trains on every
                             position, not only the last)
    neg = [P, P, x, y, z]    one sampled negative per real position (never in history or target)
Eval records also give `target` and the frozen `candidates` (scored by logits at the last position).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from rsllm_jax.data.splits import sample_negatives


def left_pad(items: Sequence[int], length: int, pad_id: int) -> np.ndarray:
    """The last `length` items, left-padded with `pad_id`, as int32."""
    items = list(items)[-length:] if length else []
    return np.asarray([pad_id] * (length - len(items)) + items, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class SasrecTrainTransform(grain.transforms.RandomMap):
    """record -> {seq, pos, neg} int32 [max_len]; negatives redrawn for every epoch/position."""
    num_items: int
    max_len: int = 10

    def random_map(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        history = list(record["history"])[-self.max_len:]
        target = int(record["target"])
        negatives = sample_negatives(rng, record["history"], target, self.num_items, len(history))
        return {"seq": left_pad(history, self.max_len, self.num_items),
                "pos": left_pad(history[1:] + [target], self.max_len, self.num_items),
                "neg": left_pad(negatives, self.max_len, self.num_items)}


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
