"""One table and one figure across datasets, from the experiment driver's results/<dataset>.json.

    python -m rsllm_jax.report.overview --results_dir=results [--datasets=movielens,lastfm,steam] [--out=results/overview]

Writes <out>.md (row x dataset: accuracy = hits / all test rows, with the hit count, and ValidRatio;
mean ± std when a row has several seeds) and <out>.png (accuracy per row, one group per dataset, with
SASRec and the user-blind "most popular candidate" rule drawn as reference lines). Accuracy, not
HitRatio@1, is the headline because it is comparable between an LLM that sometimes answers nothing
usable and a ranker that always answers.
"""
from __future__ import annotations

import json
import math
import os

from absl import app, flags

DATASETS = ("movielens", "lastfm", "steam")


def load(results_dir: str, datasets=DATASETS) -> dict[str, dict]:
    """dataset -> the driver's output; datasets without a results file are left out."""
    out = {}
    for ds in datasets:
        path = os.path.join(results_dir, f"{ds}.json")
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); rebuild it with "
                             f"`python -m rsllm_jax.report.experiments --dataset={ds} --collect_only`") from None
        for key in ("summary", "runs"):
            if not isinstance(data.get(key), (dict, list)):
                raise ValueError(f"{path}: field '{key}' missing; not written by rsllm_jax.report.experiments?")
        out[ds] = data
    if not out:
        raise FileNotFoundError(f"no results/<dataset>.json for {', '.join(datasets)} under {results_dir}")
    return out


def cell(stat, digits=3) -> str:
    if not stat:
        return "—"
    if stat.get("std") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _n_test(data: dict) -> int | None:
    ns = data.get("n_test") or []  # written by experiments' collection
    return ns[0] if len(ns) == 1 else None  # rows evaluated on different test sets: no hit count


def row_order(results: dict[str, dict]) -> list[str]:
    names: dict[str, None] = {}
    for data in results.values():
        # "rows" keeps the driver's order (summary's keys may have been sorted when written)
        names.update(dict.fromkeys(data.get("rows") or data["summary"]))
    return list(names)


def markdown(results: dict[str, dict]) -> str:
    datasets = list(results)
    # The likelihood readout's columns only when some dataset has it (experiments --likelihood).
    with_ll = any((s or {}).get("likelihood_hr1") for d in results.values() for s in d["summary"].values())
    head = (["row"] + [f"{ds} accuracy (hits)" for ds in datasets] + [f"{ds} ValidRatio" for ds in datasets]
            + ([f"{ds} LL HR@1" for ds in datasets] if with_ll else []))
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in row_order(results):
        acc, vr, ll = [], [], []
        for ds in datasets:
            s = results[ds]["summary"].get(name) or {}
            n = _n_test(results[ds])
            a = s.get("accuracy")
            hits = f" ({round(a['mean'] * n)})" if a and a.get("std") is None and n else ""
            acc.append(cell(a) + hits)
            vr.append("—" if name == "sasrec" else cell(s.get("valid_ratio")))
            ll.append(cell(s.get("likelihood_hr1")))
        lines.append("| " + " | ".join([f"`{name}`", *acc, *vr, *(ll if with_ll else [])]) + " |")
    refs = []
    for ds in datasets:
        ref = results[ds].get("references") or {}
        n = ref.get("n")
        if ref:
            refs.append(f"{ds} (n = {n}): most popular candidate {ref['most_popular_hr1']:.3f}, "
                        f"random {ref['random_hr1']:.3f}")
    lines += ["", "Accuracy = hits / all test rows (for `sasrec`: HR@1 of its logits over the 20 candidates). "
                  "Mean ± sample std over seeds where a row has several; the hit count where it has one."
              + (" LL HR@1: the candidates ranked by the LM's mean per-token log-likelihood of each as the answer "
                 "(never invalid)." if with_ll else "")]
    if refs:
        lines += ["", "User-blind references on the same rows: " + "; ".join(refs) + "."]
    revs = {ds: (d.get("git") or {}).get("revision", "unknown")[:12] for ds, d in results.items()}
    lines += ["", "Sources: " + ", ".join(f"`{ds}.json` (git {rev})" for ds, rev in revs.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    names = [n for n in row_order(results) if n != "sasrec"]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(3.0 + 2.4 * len(datasets), 4.2))
    cmap = plt.get_cmap("tab10")
    plotted = [0.1]  # every bar top and reference line, for the y-limit
    for j, name in enumerate(names):
        xs, ys, es = [], [], []
        for i, ds in enumerate(datasets):
            a = (results[ds]["summary"].get(name) or {}).get("accuracy")
            if a:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(a["mean"])
                es.append(a["std"] or 0.0)
        if not xs:  # a row no dataset has finished yet: no empty legend entry
            continue
        ax.bar(xs, ys, width, yerr=es if any(es) else None, label=name, color=cmap(j % 10))
        plotted += [y + e for y, e in zip(ys, es)]
    for i, ds in enumerate(datasets):
        s = (results[ds]["summary"].get("sasrec") or {}).get("accuracy")
        ref = results[ds].get("references") or {}
        plotted += [s["mean"]] if s else []
        plotted += [ref["most_popular_hr1"]] if ref else []
        if s:
            ax.hlines(s["mean"], i - 0.45, i + 0.45, colors="black", linewidth=2,
                      label="SASRec" if i == 0 else None)
        if ref:
            ax.hlines(ref["most_popular_hr1"], i - 0.45, i + 0.45, colors="gray", linestyles="--",
                      label="most popular candidate" if i == 0 else None)
            ax.hlines(ref["random_hr1"], i - 0.45, i + 0.45, colors="gray", linestyles=":",
                      label="random candidate" if i == 0 else None)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels([f"{ds}\n(n = {_n_test(results[ds]) or '?'})" for ds in datasets])
    ax.set_ylabel("test accuracy (hits / all rows)")
    ax.set_title("LLM rows vs SASRec, 20 frozen candidates")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax.set_ylim(0, 1.15 * max(plotted))  # room above the tallest bar or line; the legend sits below
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_nip(results: dict[str, dict], out: str) -> str | None:
    """The training NIP loss per answer against the step, one panel per dataset, with ln K (copying a random
    candidate title) as the line a run must get under before it can prefer the user's candidate. None when
    no run has the series (experiments.nip_per_answer)."""
    panels = {ds: [e for e in data["runs"]
                   if e.get("status") == "finished" and (e.get("nip_per_answer") or {}).get("per_step")]
              for ds, data in results.items()}
    panels = {ds: runs for ds, runs in panels.items() if runs}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    rows = list(dict.fromkeys(e["row"] for runs in panels.values() for e in runs))  # one colour per row
    plotted = []  # every loss value and floor line, for the shared y-limit
    for ax, (ds, runs) in zip(axes[0], panels.items()):
        for e in runs:
            steps, nats = zip(*e["nip_per_answer"]["per_step"])
            ax.plot(steps, nats, marker="o", ms=3, label=f"{e['row']} s{e['seed']}",
                    color=cmap(rows.index(e["row"]) % 10))
            plotted += nats
        floor = runs[0]["nip_per_answer"]["copy_floor"]
        ax.axhline(floor, color="gray", linestyle="--", label=f"copy a random candidate (ln {round(math.exp(floor))})")
        plotted.append(floor)
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("optimizer step of the run's stage", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylim(0, 1.08 * max(plotted))  # shared: every panel, from 0
    axes[0][0].set_ylabel("training NIP loss per answer (nats)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write(results_dir: str, out: str, datasets=DATASETS) -> tuple[str, str, str | None]:
    """<out>.md, <out>.png and, when runs logged it, <out>_nip.png (the training loss figure)."""
    results = load(results_dir, datasets)
    md = out + ".md"
    tmp = md + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# Overview: {', '.join(results)}\n\n" + markdown(results))
    os.replace(tmp, md)
    return md, plot(results, out + ".png"), plot_nip(results, out + "_nip.png")


def main(argv):
    del argv
    f = flags.FLAGS
    written = [p for p in write(f.results_dir, f.out or os.path.join(f.results_dir, "overview"), f.datasets) if p]
    print(open(written[0]).read())
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    # Defined here, not at import: tests and other tools import this module next to other CLIs' flags.
    flags.DEFINE_string("results_dir", "results", "where rsllm_jax.report.experiments wrote <dataset>.json")
    flags.DEFINE_list("datasets", list(DATASETS), "datasets to include (those without a results file are skipped)")
    flags.DEFINE_string("out", None, "output path without extension (default <results_dir>/overview)")
    app.run(main)
