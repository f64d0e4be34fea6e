"""Training curves as PNG from a run's metrics.jsonl.

python -m rsllm_jax.report.plot --workdir=runs/stage2-movielens [--out=curves.png]
One panel per logged series (loss terms, throughput, validation metrics) against the step.

python -m rsllm_jax.report.plot --curves=old=runs/a,new=runs/b --metric=val/accuracy \
    --refs="SASRec=0.38,most popular=0.20" --out=curves.png
Learning curves: one metric of several runs against the training windows each had seen (step x
config.train.batch_size), with horizontal reference lines.
"""
from __future__ import annotations

import json
import math
import os

from absl import app, flags

from rsllm_jax.run_files import read_metrics


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


def windows_per_step(workdir: str) -> int:
    """Training windows per optimizer step: the run's config.train.batch_size (the global batch)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: a learning curve needs the run's config (its batch size)")
    with open(path) as f:
        return int(json.load(f)["train"]["batch_size"])


def learning_curves(runs: dict[str, str], metric: str, out: str, title: str = "",
                    refs: dict[str, float] | None = None) -> str:
    """`metric` of each run (label -> run dir) against windows seen, one line per run, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, workdir in runs.items():
        series = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if metric not in series:
            raise ValueError(f"{workdir}/metrics.jsonl has no {metric!r} rows (run it with "
                             "config.train.eval_every_steps > 0); it has: " + ", ".join(sorted(series)))
        steps, values = series[metric]
        per = windows_per_step(workdir)
        ax.plot([s * per for s in steps], values, marker="o", ms=4, label=label)
    for i, (label, value) in enumerate((refs or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{len(runs) + i}", label=label)
    ax.set_xlabel("training windows seen")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or metric, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, value = part.partition("=")
        if not sep:
            raise app.UsageError(f"expected label=value, got {part!r}")
        out[label.strip()] = value.strip()
    return out


def main(argv) -> None:
    del argv
    if flags.FLAGS.curves:
        refs = {k: float(v) for k, v in _pairs(flags.FLAGS.refs).items()}
        print(learning_curves(_pairs(flags.FLAGS.curves), flags.FLAGS.metric, flags.FLAGS.out or "curves.png",
                              refs=refs))
        return
    if not flags.FLAGS.workdir:
        raise app.UsageError("give --workdir (one run's curves) or --curves (learning curves of several runs)")
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
    flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.")
    flags.DEFINE_string("out", "", "PNG path (default <workdir>/curves.png, or curves.png with --curves).")
    flags.DEFINE_string("curves", "", "label=run_dir,... : learning curves of these runs in one PNG")
    flags.DEFINE_string("metric", "val/accuracy", "the series --curves plots")
    flags.DEFINE_string("refs", "", "label=value,... : horizontal reference lines for --curves")
    app.run(main)
