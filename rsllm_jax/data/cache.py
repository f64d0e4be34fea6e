"""Processed splits on disk: the file format and the fingerprint-keyed cache.

A split directory holds `train.jsonl`, `val.jsonl`, `test.jsonl` (one record per line),
`items.tsv` (`id<TAB>title`) and, in the cache, `manifest.json`. The same files (minus the
manifest) are the export contract of `python -m rsllm_jax.data export`.

Cache layout: `<root>/<dataset>-<key>/` with key = hash of the fingerprint (protocol version,
dataset, seed, protocol parameters, sha256 of every source file). A changed source or seed gives
a new key, so it rebuilds; a directory whose manifest does not carry the same fingerprint is
never trusted. Writes go to a temp dir that is renamed into place, so a crash never leaves a
half-written split that looks valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


def default_cache_dir() -> pathlib.Path:
    """`$RSLLM_CACHE_DIR` if set, else `~/.cache/rsllm_jax/splits`."""
    env = os.environ.get("RSLLM_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "rsllm_jax" / "splits"


def fingerprint_key(fingerprint: dict) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(root: str | os.PathLike, dataset: str, fingerprint: dict) -> pathlib.Path:
    return pathlib.Path(root) / f"{dataset}-{fingerprint_key(fingerprint)}"


# ---- file format --------------------------------------------------------------------------

def _write_jsonl(path: pathlib.Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def write_split_files(out_dir: str | os.PathLike, titles: list[str], train: list[dict],
                      val: list[dict], test: list[dict]) -> dict[str, int]:
    """Write the export-contract files into `out_dir` (created if needed); returns line counts."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {name: _write_jsonl(out / f"{name}.jsonl", recs)
              for name, recs in zip(SPLITS, (train, val, test))}
    with open(out / "items.tsv", "w", encoding="utf-8") as f:
        for item_id, title in enumerate(titles):
            # Builders collapse whitespace in titles, so a tab/newline here is a bug, not data.
            assert "\t" not in title and "\n" not in title, (item_id, title)
            f.write(f"{item_id}\t{title}\n")
    counts["items"] = len(titles)
    return counts


def read_split_files(split_dir: str | os.PathLike) -> tuple[list[str], list[dict], list[dict], list[dict]]:
    """Inverse of `write_split_files`: (titles, train, val, test)."""
    d = pathlib.Path(split_dir)
    titles = []
    with open(d / "items.tsv", encoding="utf-8") as f:
        for line in f:
            item_id, title = line.rstrip("\n").split("\t", 1)
            assert int(item_id) == len(titles)
            titles.append(title)
    records = []
    for name in SPLITS:
        with open(d / f"{name}.jsonl", encoding="utf-8") as f:
            records.append([json.loads(line) for line in f])
    return titles, *records


# ---- cache --------------------------------------------------------------------------------

def load_cached(path: str | os.PathLike, fingerprint: dict
                ) -> tuple[list[str], list[dict], list[dict], list[dict], dict] | None:
    """(titles, train, val, test, manifest) if `path` holds a split built from `fingerprint`."""
    path = pathlib.Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    return (*read_split_files(path), manifest)


def save_cached(path: str | os.PathLike, titles: list[str], train: list[dict], val: list[dict],
                test: list[dict], manifest: dict) -> None:
    """Atomically (re)place the split directory at `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        write_split_files(tmp, titles, train, val, test)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:
        # Another process may have renamed an identical split into place first; theirs is as good.
        if not (path / MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
