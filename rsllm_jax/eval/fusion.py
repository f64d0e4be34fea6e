"""Score fusion of the LLM's candidate likelihoods with SASRec's logits, the weight chosen on validation.

    python -m rsllm_jax.eval.fusion --run=LLM_RUN --sasrec=SASREC_RUN --dataset=movielens [--out=FILE.json]
        [--save_hits=DIR]

Per row and candidate: fused = z(LL) + w * z(logit), where LL is the LM's mean per-token log-likelihood
of the candidate as the answer (the likelihood readout), logit is SASRec's score of the candidate for
the row's history, and z standardises over the row's 20 candidates (the two scales are unrelated).
w = 0 is the likelihood readout alone and w = inf SASRec alone. w is picked on the validation rows
(the first of the grid on ties, so the LLM keeps the say when it costs nothing) and reported on the
test rows with every other grid point, so the choice is visible. This is a readout of a trained RSLLM
plus the frozen SASRec it was built on, not a new model: tables name it as the fusion.

The gate is the per-row alternative: the LLM's top candidate where its likelihood margin (top minus
second z(LL) of the row) is at least a threshold, SASRec's top elsewhere. A linear mix trusts the LLM
equally on every row; the gate trusts it only where it is sure, which is what helps when the two are
right on different rows. The threshold is picked on validation from the quantiles of the validation
margins (GATE_SHARES: the share of rows the LLM answers; first on ties, the most LLM).

It reads `LLM_RUN/likelihood/predictions_test.jsonl` and `LLM_RUN/likelihood_val/predictions_val.jsonl`
(the experiments driver's `--likelihood` evaluation writes both; each row carries every candidate's
score) and SASRec's exported user states and item table.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
GATE_SHARES = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.0)  # share of val rows the LLM answers
SPLIT_DIRS = {"test": "likelihood", "val": "likelihood_val"}  # inside an LLM run's workdir


def zscore(x: np.ndarray) -> np.ndarray:
    """Standardise each row (last axis); a constant row becomes zeros."""
    x = np.asarray(x, np.float64)
    sd = x.std(-1, keepdims=True)
    return (x - x.mean(-1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def fused_top(ll: np.ndarray, logits: np.ndarray, w: float) -> np.ndarray:
    """[n] index of the best candidate per row under weight w (inf: SASRec alone; first on ties)."""
    score = zscore(logits) if math.isinf(w) else zscore(ll) + w * zscore(logits)
    return np.argmax(score, -1)


def margin(ll: np.ndarray) -> np.ndarray:
    """[n] the LLM's confidence per row: its best minus its second-best standardised likelihood."""
    top2 = np.sort(zscore(ll), -1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def gate_thresholds(val_margins: np.ndarray, shares: Sequence[float] = GATE_SHARES) -> list[float]:
    """The margin threshold at which the LLM answers each share of the validation rows (1: every row,
    0: none, SASRec alone)."""
    return [-math.inf if s >= 1 else math.inf if s <= 0 else float(np.quantile(val_margins, 1.0 - s))
            for s in shares]


def gated_top(ll: np.ndarray, logits: np.ndarray, tau: float) -> np.ndarray:
    """[n] the LLM's top candidate where its margin is >= tau, else SASRec's (first on ties)."""
    return np.where(margin(ll) >= tau, np.argmax(ll, -1), np.argmax(logits, -1))


def read_scores(path: str, records: Sequence[dict]) -> tuple[list[int], np.ndarray]:
    """(row indices into `records`, [n, K] likelihood scores in each record's candidate order) from a
    likelihood predictions file; refused, naming the file and line, if it lacks the scores or lists
    other candidates than the split's."""
    by_user = {str(r["user"]): i for i, r in enumerate(records)}
    rows, scores = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = json.loads(line)
            if "likelihood_scores" not in p:
                raise ValueError(f"{path}:{n}: no 'likelihood_scores' (evaluate the run again with "
                                 "eval.score_candidates=True to keep every candidate's score)")
            i = by_user.get(str(p.get("user")))
            if i is None or p.get("candidates") != [int(c) for c in records[i]["candidates"]]:
                raise ValueError(f"{path}:{n}: user {p.get('user')!r} and its candidates are not a row of this split")
            rows.append(i)
            scores.append(p["likelihood_scores"])
    return rows, np.asarray(scores, np.float64)


def sasrec_logits(sasrec_dir: str, records: Sequence[dict], split_name: str) -> np.ndarray:
    """[n, K] SASRec's logits of each record's candidates, from the run's exported states and table."""
    from rsllm_jax.checkpoint import user_states

    table = np.load(os.path.join(sasrec_dir, "item_embeddings.npy"))
    with np.load(os.path.join(sasrec_dir, user_states.FILENAME), allow_pickle=False) as z:
        states, saved = z[split_name], str(z[f"{split_name}_checksum"])
    if saved != user_states.histories_checksum(records):
        raise ValueError(f"{sasrec_dir}: its {split_name} user states belong to another split")
    return np.stack([table[r["candidates"]] @ s for r, s in zip(records, states)]).astype(np.float64)


def evaluate(run_dir: str, sasrec_dir: str, split) -> dict:
    """Val and test HR@1 at every weight and gate share, the weight and share val picks, and the test
    hits at each choice."""
    out = {"weights": [str(w) for w in WEIGHTS], "gate_shares": list(GATE_SHARES)}
    per_split = {}  # name -> (records in score order, LLM scores, SASRec logits, target positions)
    for name, sub in SPLIT_DIRS.items():
        records = getattr(split, name)
        path = os.path.join(run_dir, sub, f"predictions_{name}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run the likelihood evaluation on the {name} rows "
                                    "(experiments --likelihood writes it)")
        rows, ll = read_scores(path, records)
        recs = [records[i] for i in rows]
        target = np.asarray([r["candidates"].index(r["target"]) for r in recs])
        per_split[name] = (recs, ll, sasrec_logits(sasrec_dir, records, name)[rows], target)
        out[f"{name}_rows"] = len(rows)
    taus = gate_thresholds(margin(per_split["val"][1]))
    for name, (_, ll, logits, target) in per_split.items():
        out[f"{name}_hr1"] = [float((fused_top(ll, logits, w) == target).mean()) for w in WEIGHTS]
        out[f"gate_{name}_hr1"] = [float((gated_top(ll, logits, t) == target).mean()) for t in taus]
    recs, ll, logits, target = per_split["test"]
    users = [str(r["user"]) for r in recs]
    best = int(np.argmax(out["val_hr1"]))  # first on ties: the smallest weight, the most LLM
    out.update(chosen_weight=str(WEIGHTS[best]), test_hr1_at_chosen=out["test_hr1"][best],
               test_hits=dict(zip(users, (fused_top(ll, logits, WEIGHTS[best]) == target).astype(int).tolist())))
    g = int(np.argmax(out["gate_val_hr1"]))
    out.update(gate_share=GATE_SHARES[g],
               gate_threshold=taus[g] if math.isfinite(taus[g]) else str(taus[g]), gate_test_hr1_at_chosen=out["gate_test_hr1"][g],
               gate_test_llm_share=float((margin(ll) >= taus[g]).mean()),
               gate_test_hits=dict(zip(users, (gated_top(ll, logits, taus[g]) == target).astype(int).tolist())))
    return out


def write_hits(result: dict, run: str, dataset: str, split, out_dir: str) -> list[str]:
    """The fusion's and the gate's per-row test hits at their validation choices, as eval.paired sides:
    <out_dir>/<dataset>-<run>-fusion.json and -gate.json. Returns the two paths."""
    from rsllm_jax.eval import paired
    from rsllm_jax.run_files import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{dataset}-{paired.hits_file_name(run)}")
    paths = []
    for suffix, label, hits in (("fusion", f"w={result['chosen_weight']}", result["test_hits"]),
                                ("gate", f"share={result['gate_share']}", result["gate_test_hits"])):
        paths.append(base.replace(".json", f"-{suffix}.json"))
        write_json_atomic(paths[-1], paired.hits_record(f"{run}:{suffix}({label})", hits, dataset, split.test))
    return paths


def main(argv) -> None:
    from absl import flags

    from rsllm_jax.data.splits import load_split
    from rsllm_jax.run_files import write_json_atomic

    f = flags.FLAGS
    split = load_split(f.dataset)
    r = evaluate(f.run, f.sasrec, split)
    r.update(run=f.run, sasrec=f.sasrec, dataset=f.dataset)
    print(f"{'w':>6} {'val HR@1':>9} {'test HR@1':>10}")
    for w, v, t in zip(r["weights"], r["val_hr1"], r["test_hr1"]):
        print(f"{w:>6} {v:>9.4f} {t:>10.4f}{'  <- chosen on val' if w == r['chosen_weight'] else ''}")
    print(f"{'gate share':>10} {'val HR@1':>9} {'test HR@1':>10}")
    for s, v, t in zip(r["gate_shares"], r["gate_val_hr1"], r["gate_test_hr1"]):
        print(f"{s:>10} {v:>9.4f} {t:>10.4f}{'  <- chosen on val' if s == r['gate_share'] else ''}")
    if f.out:
        write_json_atomic(f.out, {k: v for k, v in r.items() if not k.endswith("test_hits")})
    if f.save_hits:
        for path in write_hits(r, f.run, f.dataset, split, f.save_hits):
            print(f"test hits at the validation choice -> {path}")

if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("run", None, "an LLM run dir evaluated with the likelihood readout on val and test", required=True)
    flags.DEFINE_string("sasrec", None, "the stage-0 run it was built on", required=True)
    flags.DEFINE_string("dataset", "movielens", "the dataset whose val/test rows the runs scored")
    flags.DEFINE_string("out", "", "write the table here (JSON)")
    flags.DEFINE_string("save_hits", "", "write the test hits at the chosen weight into this directory "
                                         "(a side for eval.paired)")
    app.run(main)
