"""Files a run leaves behind, written once per run: only process 0 writes (a multi-host run produces one
file, not one per host), and whole files go through a rename so readers never see half of one.
Shared by training, evaluation and reporting, so none of them imports another for it."""
from __future__ import annotations

import json
import os

import jax


def is_writer() -> bool:
    return jax.process_index() == 0


def write_json_atomic(path: str, obj) -> None:
    """Whole-file JSON write via rename: readers never see half a file."""
    if not is_writer():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
