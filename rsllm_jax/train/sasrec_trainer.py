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
from rsllm_jax.checkpoint.manager import RunCheckpoints
from rsllm_jax.data import pipeline, sasrec_batches
from rsllm_jax.data.splits import SplitData, eval_subset, load_split_from_config
from rsllm_jax.eval import ranking
from rsllm_jax.models.sasrec import SASRec, SASRecConfig, item_table, set_item_tables
from rsllm_jax.checkpoint import user_states
from rsllm_jax.train.nonfinite import NonFiniteGuard, skip_nonfinite
from rsllm_jax.train.sasrec_step import eval_scores, train_step
from rsllm_jax.train.preemption import Preempted, Preemption
from rsllm_jax.run_files import is_writer, write_json_atomic
from rsllm_jax.train.run_log import MetricsLog, Progress


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
    abstract_state = jax.eval_shape(init_state, rng)
    state_sh = jax.tree.map(lambda _: repl, abstract_state)  # SASRec is small: replicate, shard the batch
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
    data_iter = iter(train_ds)
    ckpts = RunCheckpoints(workdir, keep=cfg.sasrec.keep_checkpoints)
    meta = dict(best_hr1=-1.0, best_epoch=-1, bad_evals=0, train_time_s=0.0)
    if ckpts.latest_step() is not None:
        step0, state, meta = ckpts.restore_latest(abstract_state, data_iter)
        state = jax.device_put(state, state_sh)
        logging.info("resumed from step %d (epoch %d) in %s", step0, step0 // steps_per_epoch, workdir)
    else:
        state = jax.jit(init_state, out_shardings=state_sh)(rng)

    log = MetricsLog(workdir, resume_step=int(state["step"]))
    guard = NonFiniteGuard(cfg.get("max_nonfinite_steps", 5), "sasrec", workdir, log, hint="lower config.sasrec.lr")
    t_mark = time.time()
    start_step = int(state["step"])
    progress = Progress(total_steps, start_step, desc=f"sasrec[{split.dataset}]")
    stop = False
    # The loss averaged since the last logged step travels in the checkpoint, so a run resumed between
    # two log steps logs the same average an unbroken run does.
    loss_acc, n_acc = meta.pop("loss_window", (0.0, 0))

    def save(done: int) -> None:
        nonlocal t_mark
        now = time.time()
        meta["train_time_s"] = meta.get("train_time_s", 0.0) + now - t_mark
        t_mark = now
        ckpts.save(done, state, data_iter, meta=dict(meta, loss_window=(float(loss_acc), n_acc)))

    def end_of_epoch(done: int) -> bool:
        """Validate, keep the best, checkpoint; True when early stopping says to stop."""
        epoch, stop = done // steps_per_epoch, False
        if epoch % cfg.sasrec.eval_every_epochs == 0 or done == total_steps:
            val = evaluate(model, state["params"], split.val, cfg, mesh, eval_fn)
            log.write({"step": done, "epoch": epoch, **{f"val/{k}": v for k, v in val.items()}})
            progress.write(f"epoch {epoch}: val HR@1(20 cand) {val['hr1_cand']:.4f} "
                           f"HR@10 {val['hr10']:.4f} NDCG@10 {val['ndcg10']:.4f}")
            if val["hr1_cand"] > meta["best_hr1"]:
                meta.update(best_hr1=val["hr1_cand"], best_epoch=epoch, bad_evals=0)
                ckpts.save_best(done, state, val, meta=dict(epoch=epoch))
            else:
                meta["bad_evals"] += 1
                stop = meta["bad_evals"] >= cfg.sasrec.patience
        if epoch % cfg.sasrec.checkpoint_every_epochs == 0 or stop or done == total_steps:
            save(done)  # training time accumulates across restarts, so a resumed run reports its whole cost
        return stop

    with jax.set_mesh(mesh), Preemption() as sigterm:
        # A run that already early-stopped is finished: restarting it only re-evaluates.
        end_step = start_step if meta.get("bad_evals", 0) >= cfg.sasrec.patience else total_steps
        for step in range(start_step, end_step):
            batch = sharding.global_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch, rng)
            done = step + 1
            if guard.check(done, {"loss": metrics["loss"]}):
                loss_acc, n_acc = loss_acc + metrics["loss"], n_acc + 1
            if (done % cfg.log_every_steps == 0 or done == total_steps) and n_acc:
                loss = float(loss_acc) / n_acc
                rate = progress.update(done - progress.bar.n, n_acc * bs, {"loss": loss})
                log.write({"step": done, "epoch": done / steps_per_epoch, "loss": loss, "samples_per_s": rate})
                loss_acc, n_acc = 0.0, 0
            if done % steps_per_epoch == 0:
                stop = end_of_epoch(done)
            # Checked after the epoch's evaluation, so a run preempted at an epoch boundary has already
            # validated (and kept its best) for that epoch when it resumes.
            if done < end_step and not stop and sigterm.requested():
                save(done)
                progress.close()
                ckpts.wait()
                ckpts.close()
                raise Preempted("sasrec", done)
            if stop:
                progress.write(f"early stop at epoch {done // steps_per_epoch}: no val HR@1 gain in "
                               f"{cfg.sasrec.patience} evaluations")
                break
    progress.close()
    ckpts.wait()

    best_step, best_state, best_meta = ckpts.restore_best(abstract_state)
    best_params = best_state["params"]
    rows = cfg.eval.max_rows  # the LLM rows' evaluation subset, so the tables compare the same rows
    with jax.set_mesh(mesh):
        val = evaluate(model, best_params, eval_subset(split.val, rows), cfg, mesh, eval_fn)
        test = evaluate(model, best_params, eval_subset(split.test, rows), cfg, mesh, eval_fn)
        extra = {"test_all_rows": evaluate(model, best_params, split.test, cfg, mesh, eval_fn)} if rows else {}
    ckpts.close()
    results = dict(
        dataset=split.dataset, eval_rows=split.manifest.get("eval_rows"), best_step=best_step, best_epoch=best_meta.get("epoch"), val=val, test=test, **extra,
        loss=cfg.sasrec.loss, num_items=split.num_items, train_samples=len(split.train),
        wall_time_s=round(time.time() - t_start, 1), train_time_s=round(meta.get("train_time_s", 0.0), 1),
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
