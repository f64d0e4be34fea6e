"""SASRec vs SASRec + P2Rec as a markdown table, from one or more p2rec_augment results.json files.

python -m rsllm_jax.p2rec.compare runs/p2rec_augment-movielens/results.json runs/p2rec_augment-lastfm/results.json
    [--split=test|val|val+test] [--labels=a,b] [--out=results/p2rec/comparison.md] [--plot=docs/img/p2rec_val_curves.png]
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

from rsllm_jax.eval.paired import sign_test

COLUMNS = ("dataset", "model", "n", "HR@1 (20 cand)", "HR@10", "NDCG@10",
           "cold n", "cold HR@1", "cold HR@10", "cold NDCG@10", "HR@1 vs SASRec: rows won/lost (sign-test p)")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def _row(dataset: str, label: str, m: dict) -> list[str]:
    cold = m.get("cold", {})
    return [dataset, label] + [_fmt(m.get(k)) for k in ("n",) + METRICS] + [_fmt(cold.get(k)) for k in ("n",) + METRICS]


METRICS = ("hr1_cand", "hr10", "ndcg10")
SPLITS = ("val", "test", "val+test")


def pooled(a: dict, b: dict) -> dict:
    """Metrics of two disjoint row sets as one (each metric is a mean over rows: weight by n), recursing
    into the cold breakdown. Pooling val and test halves the noise of a 95-row test set; no model
    selection reads the pooled number (the best epoch is chosen on val alone)."""
    n = (a.get("n") or 0) + (b.get("n") or 0)
    out = dict(n=n)
    for k in METRICS:
        parts = [(m[k], m["n"]) for m in (a, b) if m.get("n") and m.get(k) is not None]
        out[k] = sum(v * w for v, w in parts) / sum(w for _, w in parts) if parts else None
    if "cold" in a or "cold" in b:
        out["cold"] = pooled(a.get("cold", {}), b.get("cold", {}))
    return out


def split_metrics(model: dict, split: str) -> dict:
    return pooled(model["val"], model["test"]) if split == "val+test" else model[split]


def row_hits(model: dict, split: str) -> list[int] | None:
    """Per-row HR@1 hits (val then test for val+test); None for results written before they were kept."""
    parts = ("val", "test") if split == "val+test" else (split,)
    if not all("per_row" in model[s] for s in parts):
        return None
    return [h for s in parts for h in model[s]["per_row"]["hit1"]]


def _paired(r: dict, split: str) -> str:
    base, new = row_hits(r["base"], split), row_hits(r["p2rec"], split)
    if base is None or new is None:
        return "-"
    won, lost, p = sign_test(base, new)
    return f"{won}/{lost} (p={p:.2f})"


def markdown_table(results: Sequence[dict], split: str = "test") -> str:
    """One row per model; a base SASRec shared by several augmented runs is listed once."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    seen_base = set()
    for r in results:
        base_key = (r["dataset"], r["base"]["info"].get("run_dir"))
        if base_key not in seen_base:
            seen_base.add(base_key)
            lines.append("| " + " | ".join(_row(r["dataset"], "SASRec", split_metrics(r["base"], split)) + ["-"]) + " |")
        lines.append("| " + " | ".join(_row(r["dataset"], _label(r), split_metrics(r["p2rec"], split)) + [_paired(r, split)])
                     + " |")
    return "\n".join(lines)


def _label(r: dict) -> str:
    if r.get("label"):  # given on the command line (--labels)
        return r["label"]
    info = r["p2rec"]["info"]
    untuned = ", pretrained LLM" if info.get("llm") == "pretrained" else ""
    return f"SASRec + P2Rec ({info.get('reduce')}, {info.get('mode')}{untuned})"


def plot_val_curves(results: Sequence[dict], out: str, metrics=("val/hr1_cand", "val/ndcg10")) -> str:
    """Validation curves (every evaluation epoch) of the base SASRec and each augmented one, one panel per
    (dataset, metric), read from the runs' metrics.jsonl (`info.run_dir`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsllm_jax.run_files import read_metrics

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(5 * len(metrics), 3.2 * len(datasets)),
                             squeeze=False)
    for row, dataset in enumerate(datasets):
        curves = {}
        for r in (r for r in results if r["dataset"] == dataset):
            curves.setdefault("SASRec", r["base"]["info"]["run_dir"])
            curves[_label(r)] = r["p2rec"]["info"]["run_dir"]
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for label, run_dir in curves.items():
                series = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                steps, values = series.get(metric, ([], []))
                ax.plot(steps, values, marker="o", ms=3, label=label)
            ax.set_title(f"{dataset}: {metric}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def load_results(paths: Sequence[str]) -> list[dict]:
    results = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if r.get("stage") != "p2rec_augment":
            raise ValueError(f"{path}: not a p2rec_augment results.json (stage={r.get('stage')!r})")
        results.append(r)
    return results


def main(argv) -> None:
    if len(argv) < 2:
        raise app.UsageError("give one or more p2rec_augment results.json paths")
    results = load_results(argv[1:])
    labels = flags.FLAGS.labels or []
    if labels and len(labels) != len(results):
        raise app.UsageError(f"--labels has {len(labels)} entries for {len(results)} results.json files")
    for r, label in zip(results, labels):
        r["label"] = label
    table = markdown_table(results, split=flags.FLAGS.split)
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(table + "\n")
    print(table)
    if flags.FLAGS.plot:
        print(plot_val_curves(results, flags.FLAGS.plot))


if __name__ == "__main__":
    # Defined here, not at import: run_augment imports this module next to other CLIs' flags.
    flags.DEFINE_enum("split", "test", list(SPLITS), "Which split's metrics to tabulate (val+test: both pooled).")
    flags.DEFINE_string("out", None, "Also write the table to this file.")
    flags.DEFINE_list("labels", None, "Row labels for the augmented models, one per results.json, in order.")
    flags.DEFINE_string("plot", None, "Also plot the runs' validation curves (base vs augmented) to this PNG.")
    app.run(main)
