"""SASRec vs SASRec + P2Rec as a markdown table, from one or more p2rec_augment results.json files.

python -m rsllm_jax.p2rec.compare runs/p2rec_augment-movielens/results.json runs/p2rec_augment-lastfm/results.json
    [--split=test] [--out=results/p2rec/comparison.md]
"""
from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags

COLUMNS = ("dataset", "model", "n", "HR@1 (20 cand)", "HR@10", "NDCG@10",
           "cold n", "cold HR@1", "cold HR@10", "cold NDCG@10")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def _row(dataset: str, label: str, m: dict) -> list[str]:
    cold = m.get("cold", {})
    return [dataset, label] + [_fmt(m.get(k)) for k in ("n", "hr1_cand", "hr10", "ndcg10")] + \
        [_fmt(cold.get(k)) for k in ("n", "hr1_cand", "hr10", "ndcg10")]


def markdown_table(results: Sequence[dict], split: str = "test") -> str:
    """One row per model; a base SASRec shared by several augmented runs is listed once."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    seen_base = set()
    for r in results:
        base_key = (r["dataset"], r["base"]["info"].get("run_dir"))
        if base_key not in seen_base:
            seen_base.add(base_key)
            lines.append("| " + " | ".join(_row(r["dataset"], "SASRec", r["base"][split])) + " |")
        info = r["p2rec"]["info"]
        untuned = ", pretrained LLM" if info.get("llm") == "pretrained" else ""
        label = f"SASRec + P2Rec ({info.get('reduce')}, {info.get('mode')}{untuned})"
        lines.append("| " + " | ".join(_row(r["dataset"], label, r["p2rec"][split])) + " |")
    return "\n".join(lines)


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
    table = markdown_table(load_results(argv[1:]), split=flags.FLAGS.split)
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    # Defined here, not at import: run_augment imports this module next to other CLIs' flags.
    flags.DEFINE_enum("split", "test", ["val", "test"], "Which split's metrics to tabulate.")
    flags.DEFINE_string("out", None, "Also write the table to this file.")
    app.run(main)
