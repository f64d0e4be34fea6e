"""Grain input pipelines over split records (style.md §11).

Training: `source -> seed -> shuffle -> repeat -> transform -> per-process slice -> batch`.
The per-example transform runs *before* the process slice on purpose: Grain keys a random
transform's rng by the element's index in its parent, so mapping the global stream makes every
example's random draws (negatives, candidates) depend only on (seed, global position), not on
how many processes read the data. Mapping is lazy, so each process still only computes its own
slice.

An optional `batch_transform` runs on whole *global* batches (then each process keeps its rows
p::process_count, the same examples the per-example path gives it). It is for work that is much
cheaper vectorised over a batch than per example (SASRec's negative sampling); its rng is keyed by
the global batch index, so its draws do not depend on the process count either. Every process
computes the whole global batch there: fine for small arrays, not for LLM prompts.

Evaluation: no shuffle, no repeat; the record list is padded to a whole number of *global*
batches before slicing (so every process yields the same number of batches - a multi-host
requirement) and every example carries a boolean `valid` (False on padding).

Iterators returned by `iter(ds)` support `get_state()` / `set_state()` and plug into orbax via
`grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from rsllm_jax.data.splits import sample_candidates, sample_negatives

__all__ = ["train_dataset", "eval_dataset", "sample_negatives", "sample_candidates"]

EVAL_TRANSFORM_SEED = 0  # random eval transforms get a fixed seed so evaluation is repeatable


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: readers/splits/export must not need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    return global_batch_size // process_count


def _is_random(transform: Any) -> bool:
    """RandomMap objects and plain callables taking (record, rng) are random transforms."""
    if isinstance(transform, grain.transforms.RandomMap):
        return True
    if isinstance(transform, grain.transforms.Map):
        return False
    return len(inspect.signature(transform).parameters) == 2


def _apply(ds: grain.MapDataset, transform: Any, seed: int | None = None) -> grain.MapDataset:
    if _is_random(transform):
        return ds.random_map(transform, seed=seed)
    return ds.map(transform)


def _process_rows(process_index: int, process_count: int, batch: dict) -> dict:
    return {k: v[process_index::process_count] for k, v in batch.items()}


def train_dataset(records: Sequence[dict], transform: Callable | grain.transforms.Map
                  | grain.transforms.RandomMap, *, global_batch_size: int, seed: int,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, worker_count: int = 0,
                  batch_transform: Callable | grain.transforms.Map | grain.transforms.RandomMap
                  | None = None) -> grain.IterDataset:
    """Shuffled (reshuffled every epoch), repeated, per-process batches of `transform(record[, rng])`,
    optionally followed by `batch_transform(global_batch[, rng])`.

    `num_epochs=None` repeats forever. Batches have a static size `global_batch_size //
    process_count` (the last partial batch is dropped). `worker_count > 0` runs the transforms in
    Grain worker processes.
    """
    pi, pc = _process(process_index, process_count)
    local = _local_batch_size(global_batch_size, pc)
    if not records:
        raise ValueError("no training records")
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(num_epochs)
    ds = _apply(ds, transform)
    if batch_transform is None:
        ds = ds[pi::pc].batch(local, drop_remainder=True)
    else:
        ds = _apply(ds.batch(global_batch_size, drop_remainder=True), batch_transform)
        if pc > 1:
            ds = ds.map(functools.partial(_process_rows, pi, pc))
    out = ds.to_iter_dataset()
    if worker_count > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


class _WithValid:
    """Adds the `valid` flag after the user's transform (padding examples are copies of record 0)."""

    def __init__(self, transform: Any, random: bool):
        self._transform, self._random = transform, random

    def __call__(self, pair: tuple[dict, bool], rng: np.random.Generator | None = None) -> dict:
        record, valid = pair
        if self._random:
            fn = getattr(self._transform, "random_map", self._transform)
            out = fn(record, rng)
        else:
            out = getattr(self._transform, "map", self._transform)(record)
        return {**out, "valid": np.bool_(valid)}


def eval_dataset(records: Sequence[dict], transform: Callable | grain.transforms.Map
                 | grain.transforms.RandomMap, *, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """Every record exactly once, in order, padded to whole global batches with `valid=False`.

    Process p gets records p, p + process_count, ...; concatenating the valid examples of all
    processes' batches covers each record once.
    """
    pi, pc = _process(process_index, process_count)
    local = _local_batch_size(global_batch_size, pc)
    if not records:
        raise ValueError("no evaluation records")
    n = len(records)
    padded = -(-n // global_batch_size) * global_batch_size
    ds = grain.MapDataset.range(padded).map(lambda i: (records[i if i < n else 0], i < n))
    random = _is_random(transform)
    wrapped = _WithValid(transform, random)
    ds = ds.random_map(wrapped, seed=EVAL_TRANSFORM_SEED) if random else ds.map(wrapped)
    return ds[pi::pc].batch(local, drop_remainder=True).to_iter_dataset()
