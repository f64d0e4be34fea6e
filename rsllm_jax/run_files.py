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


# Not plotted or tabulated as series: bookkeeping fields of a metrics.jsonl row.
SKIP = {"step", "epoch", "n", "wall_time_s"}


def read_metrics(path: str) -> dict[str, tuple[list[float], list[float]]]:
    """series name -> (steps, values); later lines for the same step (a resumed run) win."""
    by_step: dict[str, dict[float, float]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not JSON ({e})") from None
            step = rec.get("step")
            for k, v in rec.items():
                if k in SKIP or k.endswith("/n") or step is None or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                by_step.setdefault(k, {})[float(step)] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_step.items()}
