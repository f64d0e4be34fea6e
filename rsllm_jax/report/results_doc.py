"""Regenerate the tables (and comparison figures) of docs/results.md from the committed results.

    python -m rsllm_jax.report.results_doc --results_dir=results --doc=docs/results.md

A table sits between `<!-- name -->` and `<!-- /name -->`; everything outside the markers is prose and
is left alone. Every number comes from a committed file: the driver's results/<dataset>.{md,json},
results/overview.md (`python -m rsllm_jax.report.overview`), and each comparison's own results json and
metrics.jsonl logs (the paths are in COMPARISONS and STEP_TABLES below, next to the experiment that
wrote them). A marker this module does not know, or one left open, is an error naming its line.
The figures in FIGURES (training loss against windows seen, per comparison) are redrawn next to the doc.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from absl import app, flags

from rsllm_jax.report.experiments import mean_std as _stats
from rsllm_jax.report.overview import cell as _cell
from rsllm_jax.train.nce_pool import nce_pool_size

DATASETS = ("movielens", "lastfm", "steam")


@dataclass(frozen=True)
class Entry:
    """One line of a comparison table: `row` of the driver's results json, under a label."""
    label: str
    row: str
    results: str  # driver output, relative to results_dir
    logs: str  # where the run's metrics.jsonl was copied (<logs>/<row>-s0/), relative to results_dir


def _entry_run(results_dir: str, entry: Entry) -> dict | None:
    """The entry's finished seed-0 run (the comparisons' logs are seed 0's), or None."""
    return next((e for e in _finished_runs(os.path.join(results_dir, entry.results))
                 if e["row"] == entry.row and e.get("seed", 0) == 0), None)


def _main(ds: str, row: str, label: str) -> Entry:
    return Entry(label, row, f"{ds}.json", f"logs/{ds}")


# Comparison runs reuse the main tables' stage 0 and stage 1 and change one thing (docs/results.md
# gives each one's command).
COMPARISONS: dict[str, list[Entry]] = {
    # 32 steps of 8 instead of 8 steps of 32 (MovieLens, same 256 windows).
    "b8-table": [e for row in ("text_ft", "rsllm") for e in (
        _main("movielens", row, f"`{row}`, 32 x 8"),
        Entry(f"`{row}`, 8 x 32", row, "budget/b8/movielens.json", "budget/b8/logs"))],
    # Stage 2's peak learning rate (MovieLens).
    "lr-table": [_main("movielens", "rsllm", "8e-4 (LLaRA)"),
                 Entry("2e-4", "rsllm", "stage2_lr/lr2e-4/movielens.json", "stage2_lr/lr2e-4/logs")],
    # Stage 2's gradient clipped globally (the spec) or per parameter group.
    # MovieLens' global row is re-run too: the main table's predates the per-group norm logging.
    "clip-table": [
        _main("movielens", "rsllm", "movielens, global (main table)"),
        Entry("movielens, global (re-run)", "rsllm", "stage2_clip/global/movielens.json", "stage2_clip/global/logs/movielens"),
        Entry("movielens, group", "rsllm", "stage2_clip/group/movielens.json", "stage2_clip/group/logs/movielens"),
        _main("lastfm", "rsllm", "lastfm, global (main table)"),
        Entry("lastfm, group", "rsllm", "stage2_clip/group/lastfm.json", "stage2_clip/group/logs/lastfm")],
    # Stage 2's InfoNCE negatives: one micro-batch of 4 (the spec's in-batch form) or the step's 32 rows.
    "pool-table": [
        _main("movielens", "rsllm", "micro-batch pool (4), global clip (main table)"),
        Entry("step pool (32), global clip", "rsllm", "stage2_pool/step/movielens.json", "stage2_pool/step/logs/movielens"),
        Entry("step pool (32), group clip", "rsllm", "stage2_pool/step_clip_group/movielens.json",
              "stage2_pool/step_clip_group/logs/movielens")],
}
# The data budget (MovieLens): 256 windows in 8 steps of 32 (main table) or 32 of 8 (b8), 1,024 in 128 of 8.
_BUDGETS = (("256 windows, 8 x 32", "movielens.json", "logs/movielens"),
            ("256 windows, 32 x 8", "budget/b8/movielens.json", "budget/b8/logs"),
            ("1,024 windows, 128 x 8", "budget/w1024/movielens.json", "budget/w1024/logs"))
COMPARISONS["w1024-table"] = [Entry(f"`{row}`, {label}", row, res, logs)
                              for row in ("text_ft", "rsllm") for label, res, logs in _BUDGETS]

# In-batch InfoNCE against its chance level, ln(pool): the negatives are the other rows of a micro-batch, or of
# the whole step with config.loss.nce_pool="step".
INFONCE_TABLES: dict[str, list[Entry]] = {"infonce-table": [
    _main("movielens", "rsllm", "movielens `rsllm`, 256 windows, 8 x 32"),
    _main("movielens", "no_tt", "movielens `no_tt`, 256 windows, 8 x 32"),
    _main("movielens", "no_stage1", "movielens `no_stage1`, 256 windows, 8 x 32"),
    Entry("movielens `rsllm`, 256 windows, 32 x 8", "rsllm", "budget/b8/movielens.json", "budget/b8/logs"),
    Entry("movielens `rsllm`, 1,024 windows, 128 x 8", "rsllm", "budget/w1024/movielens.json", "budget/w1024/logs"),
    Entry("movielens `rsllm`, 256 windows, 8 x 32, pool = step", "rsllm", "stage2_pool/step/movielens.json",
          "stage2_pool/step/logs/movielens"),
    _main("lastfm", "rsllm", "lastfm `rsllm`, 256 windows, 8 x 32")]}

# Figures (path relative to the doc's directory -> entries): the training NIP loss per answer against the
# training windows seen, averaged over each 32 windows so runs with different batch sizes line up.
FIGURES: dict[str, list[Entry]] = {"img/budget_nip.png": COMPARISONS["w1024-table"]}

# Per-step gradient norms (before clipping): label -> (logs dir relative to results_dir, row).
STEP_TABLES: dict[str, list[tuple[str, str, str]]] = {
    "lr-steps": [("`text_ft` (stage 1)", "logs/movielens", "text_ft"),
                 ("`rsllm` 8e-4", "logs/movielens", "rsllm"),
                 ("`rsllm` 2e-4", "stage2_lr/lr2e-4/logs", "rsllm")]
                + [(f"`{r}` 8e-4", "logs/movielens", r) for r in ("no_ut", "no_tt", "no_stage1", "llara_like")],
    "clip-steps": [("movielens, global (re-run)", "stage2_clip/global/logs/movielens", "rsllm"),
                   ("movielens, group", "stage2_clip/group/logs/movielens", "rsllm"),
                   ("lastfm, global (main table)", "logs/lastfm", "rsllm"),
                   ("lastfm, group", "stage2_clip/group/logs/lastfm", "rsllm")],
}

_MARKER = re.compile(r"^<!-- (/?)([\w:-]+) -->$")


def _read_json(path: str):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None


def _finished_runs(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [e for e in _read_json(path).get("runs", []) if e.get("status") == "finished"]


def _metrics_log(path: str) -> list[dict]:
    """The training steps of a metrics.jsonl (lines with a grad_norm); [] when the file is absent."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [m for m in (json.loads(line) for line in f if line.strip()) if "grad_norm" in m]


def dataset_table(results_dir: str, ds: str) -> str | None:
    path = os.path.join(results_dir, f"{ds}.md")
    if not os.path.exists(path):
        return None
    md = open(path).read()
    start = md.find("| row | what | seeds |")
    if start < 0:
        raise ValueError(f"{path}: no table header '| row | what | seeds |'; not written by rsllm_jax.report.experiments?")
    end = md.find("\nNot in the table", start)
    return md[start:end if end >= 0 else len(md)].rstrip()


def overview_table(results_dir: str) -> str | None:
    path = os.path.join(results_dir, "overview.md")
    if not os.path.exists(path):
        return None
    md = open(path).read()
    return md[md.index("| row |"):].rstrip() if "| row |" in md else None


def _labels(runs: list[dict]) -> list[str]:
    """`row`, or `row` sSEED where the row has several finished seeds."""
    seeds: dict[str, set] = {}
    for e in runs:
        seeds.setdefault(e["row"], set()).add(e.get("seed", 0))
    return [f"`{e['row']}`" + (f" s{e.get('seed', 0)}" if len(seeds[e["row"]]) > 1 else "") for e in runs]


def _labelled_runs(results_dir: str):
    """(dataset, finished run, its table label) over every dataset's driver output, in table order."""
    for ds in DATASETS:
        runs = _finished_runs(os.path.join(results_dir, f"{ds}.json"))
        for e, label in zip(runs, _labels(runs)):
            yield ds, e, label


def likelihood_table(results_dir: str) -> str:
    lines = ["| dataset | row | LL HR@1 | hits | LL HR@1, summed log-likelihood | mean rank of the target (of 20) | "
             "copy + choice nats |", "|---|---|---|---|---|---|---|"]
    for ds, e, label in _labelled_runs(results_dir):
        m = e.get("metrics") or {}
        if m.get("likelihood_hr1") is not None:
            lines.append(f"| {ds} | {label} | {m['likelihood_hr1']:.3f} | {round(m['likelihood_hr1'] * m['n'])} / "
                         f"{m['n']} | {m['likelihood_sum_hr1']:.3f} | {m['likelihood_mean_rank']:.2f} | "
                         f"{_copy_choice(m)} |")
    return "\n".join(lines)


def nip_table(results_dir: str) -> str:
    lines = ["| dataset | run | answer tokens | NIP per answer at step 1 | NIP per answer, last quarter of the steps "
             "| above the copy floor (ln 20 = 3.00) |", "|---|---|---|---|---|---|"]
    for ds, e, label in _labelled_runs(results_dir):
        n = e.get("nip_per_answer")
        if n:
            lines.append(f"| {ds} | {label} | {n['tokens_per_answer']:.1f} | {n['first']:.2f} | {n['last']:.2f} | "
                         f"+{n['last'] - n['copy_floor']:.2f} |")
    return "\n".join(lines)


def _mean_std(values: list) -> str:
    """mean ± sample std of the numbers among `values` (the driver's statistic, the overview's format)."""
    return _cell(_stats(values))


# The goal's comparisons, seed by seed: the first row against each of the others.
SEED_DIFFS = (("rsllm", "text_ft"), ("rsllm", "sasrec"))


def seeds_table(results_dir: str) -> str | None:
    """Every row with several finished seeds: accuracy (hits) per seed, then mean ± sample std of accuracy,
    ValidRatio, 2T HR@1 and LL HR@1; then, per seed, the hit difference of the goal's comparisons (SEED_DIFFS)."""
    blocks = []
    for ds in DATASETS:
        runs = _finished_runs(os.path.join(results_dir, f"{ds}.json"))
        by_row: dict[str, dict[int, dict]] = {}
        for e in runs:
            by_row.setdefault(e["row"], {})[e.get("seed", 0)] = e
        blocks += [(ds, row, seeds) for row, seeds in by_row.items() if len(seeds) > 1]
    if not blocks:
        return None
    all_seeds = sorted({s for _, _, seeds in blocks for s in seeds})
    lines = ["| dataset | row | " + " | ".join(f"seed {s}: accuracy (hits)" for s in all_seeds)
             + " | accuracy | ValidRatio | 2T HR@1 | LL HR@1 |", "|---|---|" + "---|" * (len(all_seeds) + 4)]

    def hits(e):
        return round(e["metrics"]["accuracy"] * e["metrics"]["n"])

    for ds, row, seeds in blocks:
        cells = [f"{seeds[s]['metrics']['accuracy']:.3f} ({hits(seeds[s])})" if s in seeds else "—" for s in all_seeds]
        stats = [_mean_std([e["metrics"].get(k) for e in seeds.values()])
                 for k in ("accuracy", "valid_ratio", "two_tower_hr1", "likelihood_hr1")]
        lines.append(f"| {ds} | `{row}` | " + " | ".join(cells + stats) + " |")
    for ds in dict.fromkeys(ds for ds, _, _ in blocks):
        rows = {row: seeds for d, row, seeds in blocks if d == ds}
        for a, b in SEED_DIFFS:
            if a not in rows or b not in rows:
                continue
            both = [s for s in all_seeds if s in rows[a] and s in rows[b]]
            diffs = {s: hits(rows[a][s]) - hits(rows[b][s]) for s in both}
            cells = [f"{diffs[s]:+d} hits" if s in diffs else "—" for s in all_seeds]
            mean = _mean_std([diffs[s] / rows[a][s]["metrics"]["n"] for s in both])
            lines.append(f"| {ds} | `{a}` − `{b}` | " + " | ".join(cells) + f" | {mean} | | | |")
    return "\n".join(lines)


def _f(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _norm_summary(steps: list[dict], key: str = "grad_norm") -> str:
    v = [m[key] for m in steps if key in m]
    return f"{v[0]:.1f} / {max(v):.1f} / {v[-1]:.1f}" if v else "—"


def _copy_choice(m: dict) -> str:
    """The test target's answer loss from the likelihood readout, split into copying one of the candidates
    and choosing the target among them (ln 20 = 3.00: no preference); '—' for runs from before the split."""
    if m.get("likelihood_copy_nats") is None:
        return "—"
    return f"{m['likelihood_copy_nats']:.2f} + {m['likelihood_choice_nats']:.2f}"


def comparison_table(results_dir: str, entries: list[Entry]) -> str:
    """One line per entry; an entry whose run has not finished (or not been collected) says so."""
    lines = ["| run | ValidRatio | hits | HitRatio@1 | 2T HR@1 | LL hits / mean rank | LL copy + choice nats | "
             "NIP per answer: step 1 -> last quarter | grad norm first / max / last | "
             "projector / LoRA norm first / max / last |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        run = _entry_run(results_dir, entry)
        if run is None:
            lines.append(f"| {entry.label} | not run yet | | | | | | | | |")
            continue
        m, n = run["metrics"], run.get("nip_per_answer") or {}
        ll = (f"{round(m['likelihood_hr1'] * m['n'])} / {m['likelihood_mean_rank']:.2f}"
              if m.get("likelihood_hr1") is not None else "—")
        nip = f"{n['first']:.2f} -> {n['last']:.2f}" if n else "—"
        split = _copy_choice(m)
        steps = _metrics_log(os.path.join(results_dir, entry.logs, f"{entry.row}-s0", "metrics.jsonl"))
        groups = "—"
        if any("grad_norm/projector" in s for s in steps):
            groups = f"{_norm_summary(steps, 'grad_norm/projector')}; {_norm_summary(steps, 'grad_norm/llm')}"
        lines.append(f"| {entry.label} | {_f(m['valid_ratio'])} | {round(m['accuracy'] * m['n'])} / {m['n']} | "
                     f"{_f(m['hit_ratio_at_1'])} | {_f(m.get('two_tower_hr1'))} | {ll} | {split} | {nip} | {_norm_summary(steps)} | "
                     f"{groups} |")
    return "\n".join(lines)


def steps_table(results_dir: str, columns: list[tuple[str, str, str]]) -> str | None:
    """Step x run: the global gradient norm, or `global / projector / LoRA` where the run logged groups."""
    cols = [(label, _metrics_log(os.path.join(results_dir, logs, f"{row}-s0", "metrics.jsonl")))
            for label, logs, row in columns]
    cols = [(label, steps) for label, steps in cols if steps]
    if not cols:
        return None
    lines = ["| step | " + " | ".join(label for label, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for i in range(max(len(steps) for _, steps in cols)):
        cells = []
        for _, steps in cols:
            s = steps[i] if i < len(steps) else {}
            if "grad_norm/projector" in s:
                cells.append(f"{s['grad_norm']:.1f} / {s['grad_norm/projector']:.1f} / {s['grad_norm/llm']:.1f}")
            else:
                cells.append(f"{s['grad_norm']:.1f}" if s else "")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nip_by_windows(run: dict, bin_windows: int = 32) -> list[tuple[int, float]]:
    """(windows seen at the bin's end, mean NIP per answer over the bin) from a driver run entry's
    nip_per_answer.per_step; a step of batch b covers windows (step - 1) * b .. step * b."""
    per_step = (run.get("nip_per_answer") or {}).get("per_step") or []
    if not per_step or not run.get("steps"):
        return []
    batch = run["train_samples"] / run["steps"]
    bins: dict[int, list[float]] = {}
    for step, nats in per_step:
        bins.setdefault(int((step - 1) * batch // bin_windows), []).append(nats)
    return [((b + 1) * bin_windows, sum(v) / len(v)) for b, v in sorted(bins.items())]


def comparison_figure(results_dir: str, entries: list[Entry], out: str) -> str | None:
    """One panel per row (stage), one line per entry; None when no entry has finished."""
    panels: dict[str, list[tuple[str, list, float]]] = {}
    for entry in entries:
        run = _entry_run(results_dir, entry)
        curve = nip_by_windows(run) if run else []
        if curve:
            panels.setdefault(entry.row, []).append((entry.label, curve, run["nip_per_answer"]["copy_floor"]))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (row, lines) in zip(axes[0], panels.items()):
        for label, curve, _ in lines:
            ax.plot(*zip(*curve), marker="o", ms=3, label=label)
        floor = lines[0][2]
        ax.axhline(floor, color="gray", linestyle="--", label=f"copy a random candidate ({floor:.2f})")
        ax.set_title(f"`{row}`", fontsize=10)
        ax.set_xlabel("training windows seen in the stage (mean over each 32)", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training NIP loss per answer (nats)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _quarters(steps: list[dict], key: str) -> str:
    v = [m[key] for m in steps if key in m]
    if not v:
        return "—"
    q = max(1, len(v) // 4)
    return f"{sum(v[:q]) / q:.2f} -> {sum(v[-q:]) / q:.2f}"


def infonce_table(results_dir: str, entries: list[Entry]) -> str:
    """Per run: micro-batch, InfoNCE pool (rows per InfoNCE term), chance ln(pool), L_UT and L_TT (mean of the
    first -> last quarter of the steps, from metrics.jsonl) and the two-tower HR@1 that L_UT trains for."""
    lines = ["| run | micro-batch | InfoNCE pool | chance ln(pool) | L_UT first -> last quarter "
             "| L_TT first -> last quarter | 2T HR@1 | hits |", "|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        run = _entry_run(results_dir, entry)
        run_dir = os.path.join(results_dir, entry.logs, f"{entry.row}-s0")
        if run is None or not os.path.exists(os.path.join(run_dir, "config.json")):
            lines.append(f"| {entry.label} | not run yet | | | | | | |")
            continue
        cfg = _read_json(os.path.join(run_dir, "config.json"))
        train = cfg["train"]
        micro = train["batch_size"] // train["grad_accum_steps"]
        pool = nce_pool_size(cfg.get("loss", {}), train["batch_size"], train["grad_accum_steps"])
        steps = _metrics_log(os.path.join(run_dir, "metrics.jsonl"))
        m = run["metrics"]
        lines.append(f"| {entry.label} | {micro} | {pool} | {math.log(pool):.2f} | {_quarters(steps, 'l_ut')} | "
                     f"{_quarters(steps, 'l_tt')} | {_f(m.get('two_tower_hr1'))} | {round(m['accuracy'] * m['n'])} / {m['n']} |")
    return "\n".join(lines)


def table(results_dir: str, name: str) -> str | None:
    """The block for marker `name` (None: its inputs are not there yet, the block is left as it is)."""
    if name.startswith("table:"):
        return dataset_table(results_dir, name.split(":", 1)[1])
    if name == "overview":
        return overview_table(results_dir)
    if name == "ll-table":
        return likelihood_table(results_dir)
    if name == "nip-table":
        return nip_table(results_dir)
    if name == "seeds-table":
        return seeds_table(results_dir)
    if name in COMPARISONS:
        return comparison_table(results_dir, COMPARISONS[name])
    if name in STEP_TABLES:
        return steps_table(results_dir, STEP_TABLES[name])
    if name in INFONCE_TABLES:
        return infonce_table(results_dir, INFONCE_TABLES[name])
    raise UnknownTable(name)


class UnknownTable(KeyError):
    """A marker names no table this module builds (a KeyError inside a table builder is a bug, not this)."""


def splice(doc: str, results_dir: str, doc_path: str = "doc") -> tuple[str, list[str]]:
    """The doc with every marked block regenerated, and the names of the blocks that changed."""
    lines = doc.split("\n")
    out, changed, i = [], [], 0
    while i < len(lines):
        out.append(lines[i])
        hit = _MARKER.match(lines[i].strip())
        if not hit:
            i += 1
            continue
        closing, name = hit.groups()
        if closing:
            raise ValueError(f"{doc_path}:{i + 1}: closing marker <!-- /{name} --> without an opening one")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == f"<!-- /{name} -->"), None)
        if end is None:
            raise ValueError(f"{doc_path}:{i + 1}: <!-- {name} --> is never closed (add <!-- /{name} -->)")
        try:
            block = table(results_dir, name)
        except UnknownTable:
            raise ValueError(f"{doc_path}:{i + 1}: unknown table <!-- {name} --> (known: table:<dataset>, overview, "
                             f"ll-table, nip-table, seeds-table, {', '.join([*COMPARISONS, *STEP_TABLES, *INFONCE_TABLES])})") from None
        old = lines[i + 1:end]
        new = old if block is None else block.split("\n")
        if new != old:
            changed.append(name)
        out.extend(new)
        out.append(lines[end])
        i = end + 1
    return "\n".join(out), changed


def write(results_dir: str, doc_path: str) -> list[str]:
    with open(doc_path) as f:
        doc, changed = splice(f.read(), results_dir, doc_path)
    tmp = doc_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, doc_path)
    return changed


def write_figures(results_dir: str, doc_path: str) -> list[str]:
    """Every FIGURES entry whose inputs exist, next to the doc (paths relative to its directory)."""
    base = os.path.dirname(doc_path)
    return [p for rel, entries in FIGURES.items()
            if (p := comparison_figure(results_dir, entries, os.path.join(base, rel)))]


def main(argv):
    del argv
    changed = write(flags.FLAGS.results_dir, flags.FLAGS.doc)
    print(f"{flags.FLAGS.doc}: regenerated {', '.join(changed) if changed else 'nothing (all tables current)'}")
    for path in write_figures(flags.FLAGS.results_dir, flags.FLAGS.doc):
        print(f"drew {path}")


if __name__ == "__main__":
    flags.DEFINE_string("results_dir", "results", "the committed results (rsllm_jax.report.experiments --results_dir)")
    flags.DEFINE_string("doc", "docs/results.md", "the markdown file whose marked tables to regenerate")
    app.run(main)
