"""The export contract: a processed split as plain files that any tool can read.

`python -m rsllm_jax.data export --dataset=... --out=DIR` writes into DIR:
- `train.jsonl`, `val.jsonl`, `test.jsonl`: one JSON object per line with `user` (str),
  `history` (item ids, oldest first), `target` (item id) and, in val/test only, `candidates`
  (the frozen list of 20 distinct item ids, containing the target);
- `items.tsv`: `item_id<TAB>title`, one line per item, ids 0..n-1 (the ids the readers use);
- `manifest.json`: sources with sha256, seed, protocol parameters, counts and filtered rows.
"""
from __future__ import annotations

import json
import os
import pathlib

from rsllm_jax.data import cache as cache_lib
from rsllm_jax.data.splits import SplitData


def export_split(split: SplitData, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write `split` into `out_dir`; returns {'train', 'val', 'test', 'items'} line counts."""
    counts = cache_lib.write_split_files(out_dir, split.titles, split.train, split.val, split.test)
    (pathlib.Path(out_dir) / cache_lib.MANIFEST).write_text(
        json.dumps(split.manifest, indent=1, sort_keys=True), encoding="utf-8")
    return counts


def format_counts(split: SplitData, counts: dict[str, int]) -> str:
    """Human-readable summary printed by the CLI (counts and every filter with its reason)."""
    lines = [f"{split.dataset}: train {counts['train']}, val {counts['val']}, "
             f"test {counts['test']}, items {counts['items']}"]
    lines += [f"  filtered {reason}: {n}" for reason, n in split.manifest.get("filtered", {}).items()]
    lines += [f"  note: {note}" for note in split.manifest.get("notes", [])]
    return "\n".join(lines)
