"""Paired comparison of two recommenders on the same test rows: per-row hits, exact sign (McNemar) test.

    python -m rsllm_jax.eval.paired --base=RUN_DIR[,RUN_DIR...] --new=RUN_DIR[,RUN_DIR...] [--out=FILE.json]

A run directory is either an LLM run (its `predictions_test.jsonl`: one row per test row, `hit`) or a
SASRec run (stage 0: its exported test user states and item table score the frozen candidates, the
candidate with the highest logit is its answer, as `eval_scores` picks it). Several directories per
side (one per seed) are pooled: the i-th of --base is paired with the i-th of --new, rows stay
paired inside each pair. Rows are matched by their user (one test row per user), so a run that scored
a subset (`eval.max_rows`) is compared on the rows it has.

Besides a directory, a side may name `popular` (the user-blind rule: the candidate with the most training
interactions) or an LLM run's other readout: `DIR:grounded` (grounded answers, `grounded_hit`) or
`DIR:likelihood` (the likelihood readout's top candidate), both read from `DIR/likelihood/`, where the
experiments driver's `--likelihood` evaluation writes them.

Run directories are scratch (`runs/`), but a paired comparison pooled over seeds often spans machines:
`--save_hits=DIR` writes each side's per-row hits as a small JSON file (user -> 0/1, with the dataset and
the test rows' checksum), and a side may name such a `.json` file instead of a run directory, so the
record of a run outlives it and is committed beside the tables.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np


def sign_test(base: Sequence[int], new: Sequence[int]) -> tuple[int, int, float]:
    """Paired comparison of two models' hits on the same rows -> (rows only `new` hits, rows only `base`
    hits, two-sided exact sign-test p-value over those discordant rows; = the exact McNemar test)."""
    if len(base) != len(new):
        raise ValueError(f"paired test needs the same rows: {len(base)} vs {len(new)}")
    won = sum(1 for b, n in zip(base, new) if n and not b)
    lost = sum(1 for b, n in zip(base, new) if b and not n)
    m = won + lost
    tail = sum(math.comb(m, i) for i in range(min(won, lost) + 1)) / 2 ** m if m else 1.0
    return won, lost, min(1.0, 2 * tail)


def sasrec_hits(run_dir: str, test_records: Sequence[dict]) -> dict[str, int]:
    """User -> 1 if SASRec's highest-logit candidate is the target (ties: the first listed)."""
    from rsllm_jax.checkpoint import user_states

    table = np.load(os.path.join(run_dir, "item_embeddings.npy"))
    with np.load(os.path.join(run_dir, user_states.FILENAME), allow_pickle=False) as z:
        states, saved = z["test"], str(z["test_checksum"])
    if saved != user_states.histories_checksum(test_records):
        raise ValueError(f"{run_dir}: its test user states belong to another split")
    return {str(r["user"]): int(r["candidates"][int(np.argmax(table[r["candidates"]] @ s))] == r["target"])
            for r, s in zip(test_records, states)}


READOUTS = {  # DIR:<readout> -> (subdirectory, the prediction's hit)
    "grounded": ("likelihood", lambda p: p["grounded_hit"]),
    "likelihood": ("likelihood", lambda p: p["likelihood_target_rank"] == 1),
}


def llm_hits(run_dir: str, readout: str = "") -> dict[str, int]:
    """User -> 1 if the run's generated answer named exactly the target (LLaRA's HitRatio@1 hit), or if
    the named readout's answer is the target."""
    sub, hit = READOUTS[readout] if readout else ("", lambda p: p["hit"])
    path = os.path.join(run_dir, sub, "predictions_test.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    try:
        return {str(p["user"]): int(bool(hit(p))) for p in rows}
    except KeyError as e:
        raise ValueError(f"{path}: no {e} in its predictions (evaluate with that readout on)") from None


def popular_hits(train_records: Sequence[dict], test_records: Sequence[dict], num_items: int) -> dict[str, int]:
    """User -> 1 if the candidate with the most training interactions is the target (first listed on ties)."""
    from rsllm_jax.data.splits import item_train_counts
    from rsllm_jax.eval.answer_bias import most_popular_hits

    hits = most_popular_hits(test_records, item_train_counts(train_records, num_items))
    return {str(r["user"]): int(h) for r, h in zip(test_records, hits)}


HITS_FORMAT = "rsllm_jax.paired_hits/1"


def hits_record(source: str, hits: dict[str, int], dataset: str, test_records: Sequence[dict]) -> dict:
    """The durable record of one side's per-row hits (what `--save_hits` writes)."""
    from rsllm_jax.checkpoint import user_states

    return dict(format=HITS_FORMAT, source=source, dataset=dataset, rows=len(hits), hit_count=int(sum(hits.values())),
                test_checksum=user_states.histories_checksum(test_records), hits=dict(sorted(hits.items())))


def load_hits_file(path: str, test_records: Sequence[dict]) -> dict[str, int]:
    """User -> hit from a `--save_hits` file, refused (naming the file and field) if it is not one or if it
    scored other test rows."""
    from rsllm_jax.checkpoint import user_states

    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable hits file ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != HITS_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {HITS_FORMAT!r} (write it with --save_hits)")
    hits = rec.get("hits")
    if not isinstance(hits, dict) or not all(isinstance(v, int) and v in (0, 1) for v in hits.values()):
        raise ValueError(f"{path}: field 'hits' must map each user to 0 or 1")
    if rec.get("test_checksum") != user_states.histories_checksum(test_records):
        raise ValueError(f"{path}: field 'test_checksum' says its hits belong to other test rows than "
                         "this dataset's split")
    return {str(u): int(h) for u, h in hits.items()}


def hits_file_name(side: str) -> str:
    """A file name for a side's hits: the run directory's name and the readout (the caller prefixes
    the dataset)."""
    head, _, readout = side.rpartition(":")
    run, readout = (head, readout) if head and readout in READOUTS else (side, "")
    return "-".join([os.path.basename(os.path.normpath(run))] + ([readout] if readout else [])) + ".json"


def run_hits(run_dir: str, test_records: Sequence[dict], split=None) -> dict[str, int]:
    from rsllm_jax.checkpoint import user_states

    if run_dir.endswith(".json") and os.path.isfile(run_dir):
        return load_hits_file(run_dir, test_records)
    if run_dir == "popular":
        if split is None:
            raise ValueError("'popular' needs the split's training records")
        return popular_hits(split.train, test_records, split.num_items)
    head, _, readout = run_dir.rpartition(":")
    if head and readout in READOUTS:
        return llm_hits(head, readout)
    if os.path.exists(os.path.join(run_dir, "predictions_test.jsonl")):
        return llm_hits(run_dir)
    if os.path.exists(os.path.join(run_dir, user_states.FILENAME)):
        return sasrec_hits(run_dir, test_records)
    raise FileNotFoundError(f"{run_dir}: neither predictions_test.jsonl (an LLM run) nor {user_states.FILENAME} "
                            "(a stage-0 run)")


def compare(base_dirs: Sequence[str], new_dirs: Sequence[str], test_records: Sequence[dict], split=None) -> dict:
    """Pooled over the (base, new) pairs: hits of each, discordant rows, the sign-test p-value."""
    if len(base_dirs) != len(new_dirs):
        raise ValueError(f"--base has {len(base_dirs)} runs and --new {len(new_dirs)}: pair them one to one")
    base, new, pairs = [], [], []
    for b_dir, n_dir in zip(base_dirs, new_dirs):
        b, n = run_hits(b_dir, test_records, split), run_hits(n_dir, test_records, split)
        rows = sorted(set(b) & set(n))
        if not rows:
            raise ValueError(f"{b_dir} and {n_dir} share no test rows")
        base += [b[r] for r in rows]
        new += [n[r] for r in rows]
        pairs.append(dict(base=b_dir, new=n_dir, rows=len(rows)))
    won, lost, p = sign_test(base, new)
    return dict(rows=len(base), base_hits=int(sum(base)), new_hits=int(sum(new)), new_only=won, base_only=lost,
                p_value=p, pairs=pairs)


def main(argv) -> None:
    from absl import flags

    from rsllm_jax.data.splits import load_split

    f = flags.FLAGS
    split = load_split(f.dataset)
    from rsllm_jax.run_files import write_json_atomic

    bases, news = f.base.split(","), f.new.split(",")
    result = compare(bases, news, split.test, split)
    print(json.dumps(result, indent=1))
    if f.out:
        write_json_atomic(f.out, result)
    if f.save_hits:
        os.makedirs(f.save_hits, exist_ok=True)
        for side in dict.fromkeys(bases + news):
            if side.endswith(".json"):
                continue  # already a record
            path = os.path.join(f.save_hits, f"{f.dataset}-{hits_file_name(side)}")
            write_json_atomic(path, hits_record(side, run_hits(side, split.test, split), f.dataset, split.test))
            print(f"hits of {side} -> {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("base", None, "comma-separated run dirs (one per seed)", required=True)
    flags.DEFINE_string("new", None, "comma-separated run dirs, paired one to one with --base", required=True)
    flags.DEFINE_string("dataset", "movielens", "the dataset whose test rows the runs scored")
    flags.DEFINE_string("out", "", "also write the result here (JSON)")
    flags.DEFINE_string("save_hits", "", "also write each side's per-row hits into this directory (a side may "
                                         "later name such a .json file instead of a run directory)")
    app.run(main)
