"""CLI: `python -m rsllm_jax.data export --dataset=movielens|lastfm|steam|custom --out=DIR`.

Optional: --data_dir (default $RSLLM_DATA_DIR), --seed, --cache_dir, and for `custom`
--interactions=FILE --items=FILE. See `rsllm_jax.data.export` for the file contract.
"""
from __future__ import annotations

import sys

from absl import app, flags

from rsllm_jax.data import export, splits
from rsllm_jax.data.errors import DataError

_DATASET = flags.DEFINE_enum("dataset", None, list(splits.DATASETS), "Dataset to export.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data root (default: $RSLLM_DATA_DIR).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Split cache (default: ~/.cache/rsllm_jax/splits).")
_SEED = flags.DEFINE_integer("seed", 0, "User-split and val/test candidate seed.")
_INTERACTIONS = flags.DEFINE_string("interactions", "", "custom: CSV/TSV with user,item,timestamp.")
_ITEMS = flags.DEFINE_string("items", "", "custom: CSV/TSV with item,title.")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] != "export":
        raise app.UsageError("usage: python -m rsllm_jax.data export --dataset=NAME --out=DIR")
    if not _DATASET.value or not _OUT.value:
        raise app.UsageError("--dataset and --out are required")
    try:
        split = splits.load_split(_DATASET.value, data_dir=_DATA_DIR.value,
                                  cache_dir=_CACHE_DIR.value, seed=_SEED.value,
                                  custom_interactions=_INTERACTIONS.value,
                                  custom_items=_ITEMS.value)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = export.export_split(split, _OUT.value)
    print(export.format_counts(split, counts))
    return 0


if __name__ == "__main__":
    app.run(main)
