"""Training curves as PNG from a run's metrics.jsonl.

python -m rsllm_jax.plot --workdir=runs/stage2-movielens [--out=curves.png]
One panel per logged series (loss terms, throughput, validation metrics) against the step.
"""
from __future__ import annotations

import json
import math
import os

from absl import app, flags

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


def plot(series: dict, out: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    cols = 3
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = series[name]
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv) -> None:
    del argv
    workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise app.UsageError(f"{path} not found: --workdir must be a run directory")
    series = read_metrics(path)
    if not series:
        raise app.UsageError(f"{path} has no numeric series to plot")
    print(plot(series, out or os.path.join(workdir, "curves.png"), workdir))


if __name__ == "__main__":
    # Defined here, not at import: the experiment driver and p2rec.compare import this module's functions.
    flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.", required=True)
    flags.DEFINE_string("out", "", "PNG path (default <workdir>/curves.png).")
    app.run(main)
