"""What a run shows and leaves behind: a progress bar, metrics as JSONL, the resolved config.

Only process 0 writes, so a multi-host run produces one log, not one per host.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
from tqdm.auto import tqdm


def is_writer() -> bool:
    return jax.process_index() == 0


class MetricsLog:
    """Appends one JSON object per line to <workdir>/metrics.jsonl (kept across resumes)."""

    def __init__(self, workdir: str, name: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, name)
        if is_writer():
            os.makedirs(workdir, exist_ok=True)

    def write(self, record: dict) -> None:
        if not is_writer():
            return
        clean = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=True) + "\n")


class Progress:
    """tqdm bar over training steps showing the loss terms and throughput; ETA comes from tqdm."""

    def __init__(self, total_steps: int, initial_step: int = 0, unit: str = "step", desc: str = "train"):
        self.bar = tqdm(
            total=total_steps, initial=initial_step, unit=unit, desc=desc, disable=not is_writer(),
            dynamic_ncols=True, mininterval=1.0,
        )
        self._t = time.perf_counter()
        self._count = 0

    def update(self, steps: int, items: int, postfix: dict, item_name: str = "samples") -> float:
        """Advance by `steps`; `items` (samples or tokens) processed since the last call -> rate/s."""
        now = time.perf_counter()
        rate = items / max(now - self._t, 1e-9)
        self._t = now
        shown = {k: f"{float(v):.4g}" for k, v in postfix.items() if not math.isnan(float(v))}
        shown[f"{item_name}/s"] = f"{rate:.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(steps)
        return rate

    def write(self, msg: str) -> None:
        if is_writer():
            self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()


def write_json_atomic(path: str, obj) -> None:
    """Whole-file JSON write via rename: readers never see half a file."""
    if not is_writer():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
