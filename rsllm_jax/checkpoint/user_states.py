"""SASRec's user state for every window: stage 0 exports it, stage 2 reads it (the user slot, distillation).

The user state of a window is SASRec's output at the last position of its history: the vector SASRec
scores items with (logit of item i = state . item_table[i]). Stage 0 writes one [n, hidden] float32 array
per split, in the split's record order, to `<sasrec run>/user_states.npz` (plain arrays, no pickle),
with a checksum of the histories so a state is never paired with another split's window.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import numpy as np

from rsllm_jax.data.sasrec_batches import left_pad

FILENAME = "user_states.npz"
SPLITS = ("train", "val", "test")


def histories_checksum(records: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(np.asarray(r["history"], np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def compute(model, params, records: Sequence[dict], *, batch_size: int = 1024) -> np.ndarray:
    """[len(records), hidden] float32: SASRec's state after each record's history (deterministic)."""
    c = model.config
    fn = jax.jit(lambda p, seq: model.apply({"params": p}, seq, deterministic=True)[:, -1])
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        seq = np.stack([left_pad(r["history"], c.max_len, c.pad_id) for r in chunk])
        pad = batch_size - len(chunk)  # one static shape: pad the last chunk
        if pad:
            seq = np.concatenate([seq, np.full((pad, c.max_len), c.pad_id, np.int32)])
        out.append(np.asarray(fn(params, seq), np.float32)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, c.hidden), np.float32)


def save(run_dir: str, model, params, split) -> str:
    """Compute and atomically write every split's states (`split` is a data.splits.SplitData)."""
    arrays = {}
    for name in SPLITS:
        recs = getattr(split, name)
        arrays[name] = compute(model, params, recs)
        arrays[f"{name}_checksum"] = np.asarray(histories_checksum(recs))
    path = os.path.join(run_dir, FILENAME)
    tmp = os.path.join(run_dir, f"user_states.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def attach(split, run_dir: str) -> None:
    """Set `record['user_state']` on every train/val/test record of `split` from `run_dir`'s export."""
    path = os.path.join(run_dir, FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: SASRec's user states are written by stage 0; run "
                                f"configs/sasrec.py into {run_dir} again (a finished run only re-exports)")
    with np.load(path, allow_pickle=False) as z:
        for name in SPLITS:
            recs = getattr(split, name)
            states, saved = z[name], str(z[f"{name}_checksum"])
            if len(states) != len(recs) or saved != histories_checksum(recs):
                raise ValueError(f"{path}: the {name} states were computed on another split ({len(states)} rows, "
                                 f"checksum {saved}; this split has {len(recs)} rows, checksum "
                                 f"{histories_checksum(recs)}): re-run stage 0 on this dataset and split")
            for r, s in zip(recs, states):
                r["user_state"] = s
