"""Grain pipelines that feed the LLM stages: records -> prompts -> padded, bucketed batches.

Training: seeded shuffle (a new permutation every epoch), repeat, then one `map_with_index` that
draws the 20 candidates (redrawn each epoch: the element index grows across epochs), the template
(one per batch) and, with the curriculum on, whether the batch uses unified or text-only prompts
(probability step / total_steps). Everything random is a function of (seed, global element index),
so a resumed iterator replays exactly the batches an uninterrupted run sees.

Multi-process: the stream is cut into per-process blocks of global_batch / process_count consecutive
elements and process p takes blocks p, p + P, ... (mapping is lazy: a process renders only its own
examples). Global batch k is then exactly the single-process batch k, rows in process order, so a
run's numbers do not depend on how many hosts read the data. Hosts may pick different length buckets;
`agree_on_length` pads every host's block to the longest before the global array is assembled.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np

from rsllm_jax.data.prompts import PromptBuilder, pad_batch
from rsllm_jax.data.splits import sample_candidates


class SasrecOrder:
    """Candidates shown best first by SASRec's logit (user_state . item_table[c]): SASRec as the
    retriever that ranks, the LLM as the re-ranker that reads the ranked list (LlamaRec-style two-stage).
    The candidate set, the target and every readout stay as they are; only the order shown changes.

    `fold_tables` [K, items, hidden] (train/crossfit.py): a record carrying `order_fold` / `order_state`
    is ordered by that held-out fold's SASRec instead (training windows), the others by the full model."""

    def __init__(self, item_table: np.ndarray, fold_tables: np.ndarray | None = None):
        self.table = np.asarray(item_table, np.float32)
        self.fold_tables = None if fold_tables is None else np.asarray(fold_tables, np.float32)

    def __call__(self, record: dict, candidates) -> list[int]:
        if self.fold_tables is not None and "order_fold" in record:
            table, state = self.fold_tables[int(record["order_fold"])], record["order_state"]
        elif "user_state" in record:
            table, state = self.table, record["user_state"]
        else:
            raise ValueError("config.prompts.candidate_order='sasrec' needs SASRec's user state on every record "
                             "(checkpoint/user_states.attach)")
        scores = table[np.asarray(candidates, np.int64)] @ np.asarray(state, np.float32)
        return [int(candidates[i]) for i in np.argsort(-scores, kind="stable")]


def _process(process_index, process_count) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return pi, pc


class TrainExample:
    """Picklable per-element transform (Grain workers may run it in another process).

    Records may come from several datasets (stage 1 trains on their union): `record['dataset']`
    picks the builder (titles, domain wording) and catalogue; item ids are offset per dataset in
    `target_item` so InfoNCE's duplicate masking never confuses two datasets' item 7.
    """

    def __init__(self, builders: dict[str, PromptBuilder], *, num_items: dict[str, int], num_candidates: int,
                 seed: int, batch_size: int, use_ids: bool, curriculum_steps: int = 0, distill: bool = False,
                 order: SasrecOrder | None = None, listwise: tuple[int, int] | None = None):
        self.order = order  # None: candidates in sampled order
        # (negatives, answer tokens): pack that many candidates' answers after the target's (listwise loss)
        self.listwise = listwise
        self.builders, self.num_items, self.num_candidates = builders, num_items, num_candidates
        self.distill = distill  # emit the candidates and their answers' first tokens (listwise distillation)
        self.offsets = dict(zip(builders, np.cumsum([0] + [num_items[k] for k in builders])[:-1].tolist()))
        self.seed, self.batch_size = seed, batch_size  # the global batch: index // batch_size = step
        self.use_ids, self.curriculum_steps = use_ids, curriculum_steps
        self.num_templates = min(len(b.templates) for b in builders.values())

    def batch_choices(self, step: int) -> tuple[int, bool]:
        """(template, unified?) for the batch at `step`: the same on every example and every host."""
        rng = np.random.default_rng([self.seed, 7919, step])
        template = int(rng.integers(self.num_templates))
        unified = self.use_ids
        if unified and self.curriculum_steps:
            unified = bool(rng.random() < min(1.0, step / self.curriculum_steps))
        return template, unified

    def __call__(self, index: int, record: dict) -> dict:
        name = record.get("dataset") or next(iter(self.builders))
        builder = self.builders[name]
        template, unified = self.batch_choices(index // self.batch_size)
        rng = np.random.default_rng([self.seed, index])
        cands = sample_candidates(rng, record["history"], record["target"], self.num_items[name], self.num_candidates)
        if self.order is not None:
            cands = self.order(record, cands)
        ex = builder.render(record["history"], cands, record["target"], template, unified)
        ex.update(builder.render_target(record["target"], unified))
        ex["target_item"] = np.int32(self.offsets[name] + record["target"])
        ex["valid"] = np.int32(1)
        add_user_fields(ex, builder, record, cands, self.distill)
        if self.listwise:
            # The first N non-target candidates in the order shown: SASRec's hardest when it orders them.
            negatives, answer_tokens = self.listwise
            others = [c for c in cands if c != record["target"]][:negatives]
            ex = builder.pack_answers(ex, record["target"], others, answer_tokens)
        return ex


def add_user_fields(ex: dict, builder: PromptBuilder, record: dict, candidates, distill: bool) -> None:
    """SASRec's user state (user slot, distillation teacher) and the candidates' first answer tokens."""
    if "user_slot" in ex or distill:
        if "user_state" not in record:
            raise ValueError("config.prompts.user_slot / config.loss.weight_distill need SASRec's user state on "
                             "every record (checkpoint/user_states.attach)")
        ex["user_state"] = np.asarray(record["user_state"], np.float32)
    if distill:
        ex["cand_items"] = np.asarray(candidates, np.int32)
        ex["cand_first_token"] = np.asarray([builder.answer_ids(c)[0] for c in candidates], np.int32)


def train_batches(records: Sequence[dict], example: TrainExample, *, global_batch_size: int, seed: int,
                  buckets: Sequence[int], process_index=None, process_count=None, worker_count: int = 0):
    if not records:
        raise ValueError("no training records: the split is empty (check config.data.dataset and its files)")
    pi, pc = _process(process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {pc} processes")
    if example.batch_size != global_batch_size:
        raise ValueError(f"TrainExample.batch_size {example.batch_size} != global batch {global_batch_size}")
    ds = grain.MapDataset.source(list(records)).seed(seed).shuffle().repeat(None).map_with_index(example)
    ds = ds.batch(global_batch_size // pc, drop_remainder=True, batch_fn=functools.partial(pad_batch, buckets=buckets))
    ds = ds[pi::pc]  # this process's block of every global batch
    it = ds.to_iter_dataset()
    if worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


class EvalExample:
    """Fixed template, the split's frozen candidates, prompt only (the answer is generated)."""

    def __init__(self, builder: PromptBuilder, *, template: int, use_ids: bool, order: SasrecOrder | None = None):
        self.builder, self.template, self.use_ids, self.order = builder, template, use_ids, order

    def __call__(self, index: int, record: dict) -> dict:
        cands = record["candidates"] if self.order is None else self.order(record, record["candidates"])
        ex = self.builder.render(record["history"], cands, None, self.template, self.use_ids)
        ex.update(self.builder.render_target(record["target"], self.use_ids))
        ex["target_item"] = np.int32(record["target"])
        ex["row"] = np.int32(index)
        ex["valid"] = np.int32(1)
        add_user_fields(ex, self.builder, record, record["candidates"], False)
        return ex


def eval_batches(records: Sequence[dict], example: EvalExample, *, global_batch_size: int, buckets: Sequence[int]):
    """In order, no repeat; the last batch is filled with copies of row 0 marked valid=0 so every
    batch has the same static shape. Prompts are left-padded for generation.

    Every process reads every evaluation batch (a few hundred prompts): the batch is then the same
    host array everywhere and `sharding.host_to_global` places each process's rows on its devices."""
    recs = list(records)
    pad = (-len(recs)) % global_batch_size
    ds = grain.MapDataset.source(recs + recs[:1] * pad)
    ds = ds.map_with_index(example)
    if pad:
        n = len(recs)
        ds = ds.map_with_index(lambda i, ex: {**ex, "valid": np.int32(i < n)})
    return ds.batch(global_batch_size, drop_remainder=True, batch_fn=functools.partial(pad_batch, buckets=buckets, left=True))
