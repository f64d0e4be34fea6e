"""Stage 0: train SASRec, keep the best-by-validation checkpoint, export its item table for stage 2.

Side effects (files, logs, checkpoints) live here; the model and the step are pure.
Outputs under --workdir:
  metrics.jsonl            train loss / throughput and validation metrics over time
  checkpoints/, best/      orbax (state + Grain iterator position), resumable
  item_embeddings.npy      [num_items, hidden] float32 rows of the best model (stage 2's ID source)
  results.json             best validation and test metrics, wall time, the split manifest
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rsllm_jax import sharding
from rsllm_jax.data import pipeline, sasrec_batches
from rsllm_jax.data.splits import SplitData, eval_subset, load_split_from_config
from rsllm_jax.eval import ranking
from rsllm_jax.models.sasrec import SASRec, SASRecConfig, item_table, set_item_tables
from rsllm_jax.checkpoint import user_states
from rsllm_jax.train import loop
from rsllm_jax.train.nonfinite import skip_nonfinite
from rsllm_jax.train.sasrec_step import eval_scores, train_step
from rsllm_jax.run_files import is_writer, write_json_atomic


# ---------------------------------------------------------------- the run
def evaluate(model, params, records, cfg, mesh, eval_fn) -> dict:
    ds = pipeline.eval_dataset(
        records, sasrec_batches.SasrecEvalTransform(model.config.num_items, model.config.max_len, cfg.data.num_candidates),
        global_batch_size=cfg.sasrec.eval_batch_size,
    )
    hits, ranks, valid = [], [], []
    for batch in ds:
        ok = np.asarray(batch.pop("valid"))
        h, r = eval_fn(params, sharding.global_batch(batch, mesh))
        hits.append(np.asarray(h)), ranks.append(np.asarray(r)), valid.append(ok)
    hits, ranks, valid = np.concatenate(hits), np.concatenate(ranks), np.concatenate(valid)
    hr10, ndcg10 = ranking.hr_ndcg_at_k(ranks, 10)
    return {
        "hr1_cand": ranking.mean_of(hits, valid),
        "hr10": ranking.mean_of(hr10, valid),
        "ndcg10": ranking.mean_of(ndcg10, valid),
        "n": int(valid.sum()),
    }


def train_sasrec(cfg, workdir: str, split: SplitData | None = None, *, item_init: np.ndarray | None = None,
                 side_table: np.ndarray | None = None, side_proj: bool = False,
                 export_split: SplitData | None = None) -> dict:
    """`item_init` [num_items, hidden] initialises the item rows; `side_table` [num_items, d] is a frozen
    table added to every item vector (through a trained Dense when `side_proj`). Both are optional
    (P2Rec's augmentation); without them this is plain stage 0. `export_split` (default: `split`) is
    the split whose user states are exported (a cross-fit fold trains on part of it, exports all of it)."""
    t_start = time.time()
    split = split or load_split_from_config(cfg.data)
    logging.info("dataset %s: %d items, %d train / %d val / %d test samples", split.dataset, split.num_items,
                 len(split.train), len(split.val), len(split.test))
    mcfg = SASRecConfig(num_items=split.num_items, max_len=cfg.data.max_history, hidden=cfg.sasrec.hidden,
                        num_blocks=cfg.sasrec.num_blocks, num_heads=cfg.sasrec.num_heads, dropout=cfg.sasrec.dropout,
                        side_dim=0 if side_table is None else int(side_table.shape[1]), side_proj=side_proj)
    model = SASRec(mcfg)
    mesh = sharding.make_mesh(cfg.mesh)
    repl = sharding.replicated(mesh)
    bs = cfg.sasrec.batch_size
    steps_per_epoch = len(split.train) // bs
    if steps_per_epoch == 0:
        raise ValueError(f"config.sasrec.batch_size={bs} exceeds the {len(split.train)} training samples")
    total_steps = steps_per_epoch * cfg.sasrec.epochs

    tx = skip_nonfinite(optax.adamw(cfg.sasrec.lr, b1=0.9, b2=0.98, weight_decay=cfg.sasrec.weight_decay))
    if side_table is not None:
        # The side table is data: no updates (not even weight decay) and no optimizer state.
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda p: {k: "frozen" if k == "side_table" else "train" for k in p})

    def init_state(rng):
        params = model.init(rng, jnp.full((1, mcfg.max_len), mcfg.pad_id, jnp.int32))["params"]
        if item_init is not None or side_table is not None:
            params = set_item_tables(params, item_init, side_table)
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    rng = jax.random.key(cfg.seed)
    state_sh = jax.tree.map(lambda _: repl, jax.eval_shape(init_state, rng))  # SASRec is small: replicate, shard the batch
    batch_sh = {k: sharding.batch_sharding(mesh) for k in ("seq", "pos", "neg")}
    step_fn = jax.jit(
        functools.partial(train_step, model, tx, cfg.sasrec.loss),
        in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=0,
    )
    eval_fn = jax.jit(functools.partial(eval_scores, model))

    train_ds = pipeline.train_dataset(
        split.train, sasrec_batches.SasrecWindows(split.num_items, mcfg.max_len),
        batch_transform=sasrec_batches.SasrecNegatives(split.num_items),
        global_batch_size=bs, seed=cfg.seed, worker_count=cfg.data.grain_workers,
    )
    steps_epoch = lambda done: done // steps_per_epoch  # noqa: E731
    val_stage = loop.Validation(
        due=lambda done: done % steps_per_epoch == 0 and (
            steps_epoch(done) % cfg.sasrec.eval_every_epochs == 0 or done == total_steps),
        run=lambda st: evaluate(model, st["params"], split.val, cfg, mesh, eval_fn),
        score=lambda val: val["hr1_cand"],
        describe=lambda done, val: (f"epoch {steps_epoch(done)}: val HR@1(20 cand) {val['hr1_cand']:.4f} "
                                    f"HR@10 {val['hr10']:.4f} NDCG@10 {val['ndcg10']:.4f}"),
        tag=lambda done: {"epoch": steps_epoch(done)},
        patience=cfg.sasrec.patience,
    )

    def sasrec_step(st, host_batch):
        st, metrics = step_fn(st, sharding.global_batch(host_batch, mesh), rng)
        return st, metrics, bs

    with jax.set_mesh(mesh):
        outcome = loop.run(loop.Stage(
            name="sasrec", total_steps=total_steps, state=jax.jit(init_state, out_shardings=state_sh)(rng),
            batches=iter(train_ds), step=sasrec_step, saveable=lambda st: st,
            load=lambda st, saved: jax.device_put(saved, state_sh),
            checkpoint_due=lambda done: done % steps_per_epoch == 0 and (
                steps_epoch(done) % cfg.sasrec.checkpoint_every_epochs == 0),
            validation=val_stage, guard_keys=("loss",), item_name="samples",
            log_extra=lambda done: {"epoch": done / steps_per_epoch},
            max_nonfinite_steps=cfg.get("max_nonfinite_steps", 5), hint="lower config.sasrec.lr",
            keep_checkpoints=cfg.sasrec.keep_checkpoints, log_every_steps=cfg.log_every_steps,
            desc=f"sasrec[{split.dataset}]",
        ), workdir)
    best_step, best_meta = outcome.best_step, outcome.best_meta
    best_params = outcome.state["params"]
    rows = cfg.eval.max_rows  # the LLM rows' evaluation subset, so the tables compare the same rows
    with jax.set_mesh(mesh):
        val = evaluate(model, best_params, eval_subset(split.val, rows), cfg, mesh, eval_fn)
        test = evaluate(model, best_params, eval_subset(split.test, rows), cfg, mesh, eval_fn)
        extra = {"test_all_rows": evaluate(model, best_params, split.test, cfg, mesh, eval_fn)} if rows else {}
    results = dict(
        dataset=split.dataset, eval_rows=split.manifest.get("eval_rows"), best_step=best_step, best_epoch=best_meta.get("epoch"), val=val, test=test, **extra,
        loss=cfg.sasrec.loss, num_items=split.num_items, train_samples=len(split.train),
        wall_time_s=round(time.time() - t_start, 1), train_time_s=round(outcome.train_time_s, 1),
        manifest=split.manifest,
    )
    if is_writer():
        user_states.save(workdir, model, best_params, export_split or split)  # stage 2's user slot / distillation teacher
        table = np.asarray(item_table(best_params), dtype=np.float32)
        tmp = os.path.join(workdir, f"item_embeddings.tmp{os.getpid()}.npy")
        np.save(tmp, table)
        os.replace(tmp, os.path.join(workdir, "item_embeddings.npy"))
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    logging.info("SASRec %s test: %s", split.dataset, test)
    return results
