"""Synthetic inputs with exactly the layout the real pipeline emits, at a fixed, chosen size.

Real prompts vary in length (and are padded to buckets); a benchmark needs one fixed shape, so the
train batch here has every row exactly `seq_len` tokens long with the same keys and semantics as
`data/prompts.py` + `data/prompt_pipeline.TrainExample` produce: items written as title tokens
followed by an `[IID]` slot whose `slot_items` entry names the item, a history span, an answer span
at the end, shifted labels, and the second tower's target-alone input padded to `target_len`.
"""
from __future__ import annotations

import numpy as np

NUM_ITEMS = 1682  # MovieLens-100K's catalogue
REC_DIM = 64  # SASRec's item embedding width (spec §2)
FIRST_TEXT_ID = 3  # keep clear of special tokens at the bottom of the vocabulary


def rec_table(seed: int = 0, num_items: int = NUM_ITEMS) -> np.ndarray:
    """A stand-in for the frozen SASRec table, scaled like SASRec's init (std hidden^-0.5)."""
    return (np.random.default_rng(seed).normal(size=(num_items, REC_DIM)) * REC_DIM**-0.5).astype(np.float32)


def _layout(length: int, answer_len: int) -> tuple[int, int]:
    """(items, tokens per item incl. its slot) that fit the prompt part: LLaRA-sized (10 history +
    20 candidates) when there is room, fewer at tiny lengths."""
    prompt = length - answer_len - 1  # 1 leading text token
    items = min(30, max(1, prompt // 2))
    return items, max(2, min(8, prompt // items))


def _row(rng, length: int, answer_len: int, vocab: int, iid_id: int, num_items: int, target: int) -> dict:
    ids = rng.integers(FIRST_TEXT_ID, vocab, size=length).astype(np.int32)
    slots = np.full(length, -1, np.int32)
    history = np.zeros(length, np.int32)
    n_items, span = _layout(length, answer_len)
    n_hist = max(1, n_items // 3)
    others = rng.choice(np.setdiff1d(np.arange(num_items), [target]), n_items - 1, replace=False)
    items = np.concatenate([others[:n_hist], [target], others[n_hist:]]).astype(np.int32)  # target is a candidate
    for k, item in enumerate(items):
        end = 1 + (k + 1) * span - 1  # the slot closes the item's span
        ids[end], slots[end] = iid_id, item
        if k < n_hist:
            history[1 + k * span: end + 1] = 1
    answer = np.zeros(length, np.int32)
    if answer_len:
        answer[length - answer_len:] = 1
    return dict(input_ids=ids, attention_mask=np.ones(length, np.int32), slot_items=slots,
                history_mask=history, answer_mask=answer,
                labels=np.append(ids[1:], 0).astype(np.int32), loss_mask=np.append(answer[1:], 0).astype(np.int32))


def _target_row(rng, target_len: int, vocab: int, iid_id: int, target: int) -> dict:
    """`<title> [IID]` right-padded to target_len (render_target's layout)."""
    n = int(rng.integers(2, max(3, target_len - 4))) + 1  # title tokens + the slot
    ids = np.zeros(target_len, np.int32)
    ids[: n - 1] = rng.integers(FIRST_TEXT_ID, vocab, size=n - 1)
    ids[n - 1] = iid_id
    slots = np.full(target_len, -1, np.int32)
    slots[n - 1] = target
    mask = (np.arange(target_len) < n).astype(np.int32)
    return dict(target_input_ids=ids, target_attention_mask=mask, target_slot_items=slots)


def train_batch(*, batch: int, seq_len: int, target_len: int, vocab: int, num_items: int = NUM_ITEMS,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The stage-2 train batch (every key `rsllm_loss` reads). `vocab`: the LLM's base vocabulary; the
    `[IID]` token is id `vocab` (the first added token), as PromptBuilder assigns it."""
    rng = np.random.default_rng(seed)
    targets = rng.choice(num_items, batch, replace=False)  # distinct: no duplicate masking in InfoNCE
    answer_len = min(8, seq_len // 4)
    rows = []
    for t in targets:
        row = _row(rng, seq_len, answer_len, vocab, vocab, num_items, int(t))
        row.update(_target_row(rng, target_len, vocab, vocab, int(t)))
        row.update(target_item=np.int32(t), valid=np.int32(1))
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def prompt_batch(*, batch: int, prompt_len: int, vocab: int, num_items: int = NUM_ITEMS,
                 seed: int = 1) -> dict[str, np.ndarray]:
    """Generation prompts (no answer), all `prompt_len` long: input_ids, attention_mask, slot_items."""
    rng = np.random.default_rng(seed)
    targets = rng.choice(num_items, batch, replace=False)
    rows = [_row(rng, prompt_len, 0, vocab, vocab, num_items, int(t)) for t in targets]
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "slot_items")}


def synthetic_sasrec_records(n: int, num_items: int = NUM_ITEMS, max_len: int = 10, seed: int = 0) -> list[dict]:
    """Split-shaped records (history of 3..max_len distinct items, then a target), for when the real
    MovieLens split is unavailable."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        k = int(rng.integers(3, max_len + 1))
        items = rng.choice(num_items, k + 1, replace=False).tolist()
        records.append(dict(history=items[:k], target=items[k]))
    return records
