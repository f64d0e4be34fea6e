"""How much of a stage-2 training batch is padding, with the configs' length buckets and alternatives.

    RSLLM_DATA_DIR=../shared/data python -m benchmarks.padding --datasets=movielens,lastfm \\
        --out=results/bench/padding

Renders the default recipe's training windows exactly as the trainer does (`TrainExample`: unified
prompts, 20 candidates, the per-step template), groups them into the host batches the step sees
(a shuffled order, as the pipeline's) and pads each batch the way `pad_batch` does. Reports the fraction
of computed tokens that are padding, and the number of distinct shapes (each one a compile), for:
the coarse buckets the configs had before; FINE_BUCKETS (theirs now); and packing (concatenating windows into rows of a fixed length,
which a segment-id attention mask would need). Pure host work: no model is run.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from benchmarks.section_windows import COARSE_BUCKETS
from rsllm_jax.data.prompts import FINE_BUCKETS, bucket_length

_DATASETS = flags.DEFINE_list("datasets", ["movielens"], "datasets whose training windows to render")
_SAMPLES = flags.DEFINE_integer("samples", 1024, "training windows (the default recipe's max_train_samples)")
_MICRO = flags.DEFINE_integer("batch", 8, "rows padded together: the host batch (8 in the recipe; its micro-batches "
                               "share its width)")
_OUT = flags.DEFINE_string("out", "results/bench/padding", "directory for padding.{json,md}")


def schemes(lengths: np.ndarray, micro: int, buckets) -> dict:
    """Padding fraction and distinct shapes of each way to batch these rows (in this order)."""
    out = {}
    for name, bk in (("buckets 256, 384, ... (before)", COARSE_BUCKETS), ("FINE_BUCKETS (the configs')", FINE_BUCKETS),
                     ("exact (pad to the batch's longest)", None)):
        computed, shapes = 0, set()
        for i in range(0, len(lengths) - micro + 1, micro):
            longest = int(lengths[i:i + micro].max())
            width = longest if bk is None else bucket_length(longest, bk)
            computed += width * micro
            shapes.add(width)
        real = int(lengths[: len(lengths) // micro * micro].sum())
        out[name] = dict(padding_fraction=1 - real / computed, shapes=len(shapes))
    # Packing: rows of the largest config bucket filled first-fit in order (a window never splits).
    row_len = max(buckets)
    rows, fill = 0, row_len
    for n in lengths:
        if fill + n > row_len:
            rows, fill = rows + 1, 0
        fill += int(n)
    out[f"packed into rows of {row_len}"] = dict(padding_fraction=1 - int(lengths.sum()) / (rows * row_len),
                                                 shapes=1)
    return out


def measure(dataset: str, samples: int, micro: int) -> dict:
    from configs import stage2
    from rsllm_jax.checkpoint.loader import load_llm
    from rsllm_jax.data.prompt_pipeline import TrainExample
    from rsllm_jax.train.rsllm_trainer import prompt_builder, split_for

    cfg = stage2.get_config()
    cfg.data.dataset = dataset
    split = split_for(cfg, dataset)
    config, _, tok = load_llm(cfg.llm.model, with_tokenizer=True)
    builder = prompt_builder(cfg, tok, split, config.vocab_size)
    batch = cfg.train.batch_size
    ex = TrainExample({dataset: builder}, num_items={dataset: split.num_items},
                       num_candidates=cfg.data.num_candidates, seed=cfg.seed, batch_size=batch, use_ids=True)
    rng = np.random.default_rng(cfg.seed)
    records = [split.train[i] for i in rng.permutation(len(split.train))[:samples]]
    rendered = [ex(i, r) for i, r in enumerate(records)]
    lengths = np.asarray([len(e["input_ids"]) for e in rendered])
    # Where a window's tokens go: template text (BOS included), history, candidates, answer.
    literal = [len(builder.bos) + sum(len(builder.encode_text(lit)) for lit, _ in t if lit) for t in builder.templates]
    template = np.asarray([literal[ex.batch_choices(i // batch)[0]] for i in range(len(records))])
    history = np.asarray([int(e["history_mask"].sum()) for e in rendered])
    answer = np.asarray([int(e["answer_mask"].sum()) for e in rendered])
    parts = dict(template=template, history=history, candidates=lengths - template - history - answer, answer=answer)
    return dict(dataset=dataset, windows=len(lengths), batch=micro, buckets=list(cfg.prompts.buckets),
                parts={k: float(v.mean()) for k, v in parts.items()},
                id_slots=float(np.mean([int((e["slot_items"] >= 0).sum()) for e in rendered])),
                length=dict(mean=float(lengths.mean()), p50=float(np.median(lengths)), p95=float(np.percentile(lengths, 95)),
                            max=int(lengths.max())),
                schemes=schemes(lengths, micro, cfg.prompts.buckets))


def table(rows: list[dict]) -> str:
    lines = ["| dataset | prompt tokens mean / p95 / max | batching | padding fraction | shapes (compiles) |",
             "|---|---|---|---|---|"]
    for r in rows:
        ln = r["length"]
        for i, (name, s) in enumerate(r["schemes"].items()):
            head = f"{r['dataset']} | {ln['mean']:.0f} / {ln['p95']:.0f} / {ln['max']}" if i == 0 else " | "
            lines.append(f"| {head} | {name} | {s['padding_fraction']:.3f} | {s['shapes']} |")
    return "\n".join(lines)


def parts_table(rows: list[dict]) -> str:
    """Mean tokens per window by part of the prompt, and each part's share."""
    lines = ["| dataset | tokens per window | template text | history | candidates | answer | ID slots |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["length"]["mean"]
        cells = [f"{v:.0f} ({v / total:.0%})" for v in r["parts"].values()]
        lines.append(f"| {r['dataset']} | {total:.0f} | " + " | ".join(cells) + f" | {r['id_slots']:.0f} |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    rows = [measure(d, _SAMPLES.value, _MICRO.value) for d in _DATASETS.value]
    md = table(rows) + "\n\n" + parts_table(rows)
    print(md)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "padding.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(_OUT.value, "padding.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    app.run(main)
