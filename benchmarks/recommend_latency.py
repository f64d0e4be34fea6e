"""Serving latency of `rsllm_jax.recommend` on a trained run: load, first request (compiles), repeated
requests, and a batch of 16, for an LLM run and (optionally) its SASRec.

    RSLLM_DATA_DIR=../shared/data python -m benchmarks.recommend_latency \\
        --run=runs/exp_levers/movielens/ranked-s1 --sasrec_run=runs/exp_levers/movielens/sasrec-s1 \\
        --out=results/bench/recommend

Requests are the split's test rows (history + their 20 candidates), so every call is a real request.
Prints the table and writes DIR/recommend_latency.{json,md}. Times are wall clock; "steady" is the
median of --repeats calls after the first.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app, flags

_RUN = flags.DEFINE_string("run", None, "a finished stage-2 run directory", required=True)
_SASREC = flags.DEFINE_string("sasrec_run", "", "a SASRec run directory to time beside it (optional)")
_OUT = flags.DEFINE_string("out", "results/bench/recommend", "directory for recommend_latency.{json,md}")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls after the first")
_BATCH = flags.DEFINE_integer("batch", 16, "requests per batch call")
_EXPLAIN = flags.DEFINE_bool("explain", True, "also time one --explain request (chat models)")


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(run_dir: str, repeats: int, batch: int, explain: bool) -> dict:
    from rsllm_jax.recommend import Recommender

    load_s, rec = _time(lambda: Recommender.load(run_dir))
    rows = rec.split.test
    req = lambda r: dict(history=r["history"], candidates=r["candidates"])  # noqa: E731
    first_s, example = _time(lambda: rec.recommend(rows[0]["history"], rows[0]["candidates"], top_k=5))
    single = [_time(lambda i=i: rec.recommend(rows[i]["history"], rows[i]["candidates"]))[0]
              for i in range(1, repeats + 1)]
    batch_first_s, _ = _time(lambda: rec.recommend_batch([req(r) for r in rows[:batch]]))
    batches = [_time(lambda k=k: rec.recommend_batch([req(r) for r in rows[k * batch:(k + 1) * batch]]))[0]
               for k in range(1, max(2, min(repeats + 1, len(rows) // batch)))]  # fresh rows each call
    out = dict(run=run_dir, readout=example["readout"], candidates=len(rows[0]["candidates"]), load_s=load_s,
               first_request_s=first_s, request_s=statistics.median(single), batch=batch,
               batch_first_s=batch_first_s, batch_s=statistics.median(batches),
               per_request_in_batch_s=statistics.median(batches) / batch, example=example)
    if explain and rec.evaluator is not None and getattr(rec.built.tokenizer, "chat_template", None):
        out["explain_first_s"], ex = _time(lambda: rec.recommend(rows[0]["history"], rows[0]["candidates"],
                                                                 top_k=5, explain=True))
        out["explain_s"], _ = _time(lambda: rec.recommend(rows[1]["history"], rows[1]["candidates"], explain=True))
        out["example"] = ex
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | readout | load s | first request s (compiles) | request s (steady) | "
             "batch of 16: first s | batch of 16 s (steady) | per request in a batch s | with --explain s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ex = f"{r['explain_s']:.2f}" if "explain_s" in r else "—"
        lines.append(f"| `{os.path.basename(r['run'].rstrip('/'))}` | {r['readout']} | {r['load_s']:.1f} | "
                     f"{r['first_request_s']:.2f} | {r['request_s']:.2f} | {r['batch_first_s']:.2f} | "
                     f"{r['batch_s']:.2f} | {r['per_request_in_batch_s']:.3f} | {ex} |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    import jax

    rows = [measure(_RUN.value, _REPEATS.value, _BATCH.value, _EXPLAIN.value)]
    if _SASREC.value:
        rows.append(measure(_SASREC.value, _REPEATS.value, _BATCH.value, False))
    md = table(rows)
    print(md)
    os.makedirs(_OUT.value, exist_ok=True)
    setup = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                 load_average=os.getloadavg(), jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(os.path.join(_OUT.value, "recommend_latency.json"), "w") as f:
        json.dump(dict(setup=setup, rows=rows), f, indent=1, ensure_ascii=False, default=str)
    with open(os.path.join(_OUT.value, "recommend_latency.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    app.run(main)
