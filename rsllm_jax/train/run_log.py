"""What a run shows and leaves behind: a progress bar, metrics as JSONL, the resolved config.

Only process 0 writes, so a multi-host run produces one log, not one per host.
"""
from __future__ import annotations

import json
import math
import os
import time

from tqdm.auto import tqdm

from rsllm_jax.run_files import is_writer


class MetricsLog:
    """Appends one JSON object per line to <workdir>/metrics.jsonl (kept across resumes).

    `resume_step`: the step the run restarts from. Rows logged after it belong to steps the restart
    trains again (the process was killed between a log line and the next checkpoint), and a killed
    write can leave half a line: both are dropped, atomically, so a resumed run's log equals an
    uninterrupted one's.
    """

    def __init__(self, workdir: str, name: str = "metrics.jsonl", resume_step: int | None = None):
        self.path = os.path.join(workdir, name)
        if is_writer():
            os.makedirs(workdir, exist_ok=True)
            if resume_step is not None and os.path.exists(self.path):
                self._rewind(resume_step)

    def _rewind(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)) or row["step"] <= step:
                    kept.append(json.dumps(row, allow_nan=True) + "\n")
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

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
