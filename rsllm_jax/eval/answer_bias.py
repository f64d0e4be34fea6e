"""What drives an LLM row's answers: the user, or where and how popular a candidate is?

python -m rsllm_jax.eval.answer_bias --config=configs/stage2.py --config.data.dataset=movielens \
    [--split=test] [--out=results/answer_bias_movielens] RUN_DIR [RUN_DIR ...]

Reads each run's predictions_<split>.jsonl and, over its valid answers (exactly one candidate named):
- position: how often the answer is the k-th listed candidate; the share of the most named position and
  the chi-square p of "answers are spread evenly over the 20 positions" (the targets' positions are);
- popularity: the named item's and the target's training-interaction percentile among the row's 20
  candidates (0.5 = a random pick), and the HR@1 of the user-blind "most popular candidate" rule.
A model that learned the answer format but not the user names one position or the popular titles.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import scipy.stats
from absl import app, flags
from ml_collections import config_flags

from rsllm_jax.data.splits import item_train_counts, load_split_from_config
from rsllm_jax.run_files import write_json_atomic


def read_predictions(path: str) -> list[dict]:
    with open(path) as f:
        preds = [json.loads(line) for line in f if line.strip()]
    if preds and "named_positions" not in preds[0]:
        raise ValueError(f"{path}: predictions lack named_positions/named_items (written before they were "
                         "recorded); re-run the evaluation (python -m rsllm_jax.main --config=configs/eval.py ...)")
    return preds


def popularity_percentile(counts: np.ndarray, candidates: Sequence[int], item: int) -> float:
    """Share of the other candidates with fewer training interactions than `item` (ties count half)."""
    others = np.asarray([c for c in candidates if c != item])
    return float(((counts[others] < counts[item]).sum() + 0.5 * (counts[others] == counts[item]).sum()) / len(others))


def most_popular_hits(records: Sequence[dict], counts: np.ndarray) -> list[bool]:
    """Per row: is the candidate with the most training interactions (first listed on ties) the target?"""
    return [r["candidates"][int(np.argmax(counts[r["candidates"]]))] == r["target"] for r in records]


def most_popular_hr1(records: Sequence[dict], counts: np.ndarray) -> float:
    """HR@1 of naming the candidate with the most training interactions (first listed on ties)."""
    hits = most_popular_hits(records, counts)
    return float(np.mean(hits)) if hits else float("nan")


def answer_bias(preds: Sequence[dict], records: Sequence[dict], counts: np.ndarray) -> dict:
    """The position and popularity statistics of one run's predictions (rows index `records`)."""
    k = len(records[0]["candidates"])
    valid = [p for p in preds if len(p["named_positions"]) == 1]
    out = dict(n=len(preds), valid=len(valid), num_candidates=k)
    if not valid:
        return out
    named = np.bincount([p["named_positions"][0] for p in valid], minlength=k)
    targets = np.bincount([p["target_position"] for p in valid], minlength=k)
    top = int(np.argmax(named))
    out.update(
        named_position_counts=named.tolist(), target_position_counts=targets.tolist(),
        top_position=top + 1, top_position_share=float(named[top] / len(valid)),
        position_uniform_p=float(scipy.stats.chisquare(named).pvalue),
        named_popularity_pct=float(np.mean([popularity_percentile(counts, records[p["row"]]["candidates"],
                                                                  p["named_items"][0]) for p in valid])),
        target_popularity_pct=float(np.mean([popularity_percentile(counts, records[p["row"]]["candidates"],
                                                                   p["target_item"]) for p in valid])),
        hit_ratio_at_1=float(np.mean([p["hit"] for p in valid])),
        most_popular_hr1_same_rows=most_popular_hr1([records[p["row"]] for p in valid], counts),
    )
    return out


def table(runs: dict[str, dict]) -> list[str]:
    """Markdown rows, one per run's `answer_bias` report."""
    lines = ["| run | valid / n | HitRatio@1 | most-popular HR@1, same rows | most named position (share) | "
             "positions uniform: chi2 p | named item popularity pct | target popularity pct |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if not r.get("valid"):
            lines.append(f"| {name} | 0 / {r['n']} | - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {r['valid']} / {r['n']} | {r['hit_ratio_at_1']:.3f} | "
                     f"{r['most_popular_hr1_same_rows']:.3f} | {r['top_position']} ({r['top_position_share']:.2f}) | "
                     f"{r['position_uniform_p']:.2g} | {r['named_popularity_pct']:.2f} | "
                     f"{r['target_popularity_pct']:.2f} |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"Answer bias on {report['dataset']} {report['split']} (valid answers only). User-blind references "
             f"on all {report['rows']} rows: most-popular-candidate HR@1 {report['most_popular_hr1']:.3f}; "
             f"a random pick 1/{report['num_candidates']} = {1 / report['num_candidates']:.3f}.", ""]
    return "\n".join(lines + table(report["runs"])) + "\n"


def _define_flags() -> None:
    """Only when run as a command: other tools import this module's functions with their own flags."""
    config_flags.DEFINE_config_file("config", "configs/stage2.py", "A run config; only its data block is read.")
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which predictions_<split>.jsonl to read.")
    flags.DEFINE_string("out", "", "Write <out>.json and <out>.md (default: print only).")


def main(argv) -> None:
    run_dirs = argv[1:]
    if not run_dirs:
        raise app.UsageError("give one or more run directories holding predictions_<split>.jsonl")
    f = flags.FLAGS
    cfg, split_name, out = f.config, f.split, f.out
    split = load_split_from_config(cfg.data)
    records = getattr(split, split_name)
    counts = item_train_counts(split.train, split.num_items)
    runs = {}
    for d in run_dirs:
        path = os.path.join(d, f"predictions_{split_name}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {d} is not a finished LLM run (or evaluated another split)")
        runs[os.path.basename(os.path.normpath(d))] = answer_bias(read_predictions(path), records, counts)
    report = dict(dataset=split.dataset, split=split_name, rows=len(records),
                  num_candidates=len(records[0]["candidates"]), most_popular_hr1=most_popular_hr1(records, counts),
                  runs=runs)
    text = markdown(report)
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        write_json_atomic(out + ".json", report)
        with open(out + ".md", "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
