"""Stages 1 and 2 (spec §5) and stand-alone evaluation: what the stages give the one loop (train/loop.py).

stage1: text-only prompts over the union of `config.stage1.datasets`' train splits; NIP + both InfoNCE
        on text-only representations; LoRA (and added-token rows) trained.
stage2: the target dataset with unified (title + ID) prompts; reads the SASRec table from stage 0 and
        the LoRA from stage 1 (paths in config; `rsllm_jax.stages` trains them first when missing); trains
        LoRA + projector + added rows with the full loss.
eval:   evaluates a run directory's best (else latest) checkpoint, or the untrained model.

Outputs under the workdir: metrics.jsonl, checkpoints/ + best/ (orbax: trainable params, optimizer
state, step, Grain iterator, config), metrics_<split>.json, predictions_<split>.jsonl, results.json.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from rsllm_jax import sharding
from rsllm_jax import stages
from rsllm_jax.checkpoint.run_dirs import has_checkpoint, restore_trainable
from rsllm_jax.data.prompt_pipeline import SasrecOrder, TrainExample, train_batches
from rsllm_jax.data.prompts import DOMAIN_OF_DATASET, PromptBuilder, PromptSettings, repad
from rsllm_jax.data.splits import SplitData, load_split_from_config
from rsllm_jax.eval.evaluate import Evaluator, params_fingerprint
from rsllm_jax.models.lora import merge_trees
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import (
    count_params,
    gradient_clipping,
    make_optimizer,
    schedule_for,
)
from rsllm_jax.train.rsllm_setup import build_rsllm
from rsllm_jax.train.nce_pool import nce_pool_size
from rsllm_jax.train.rsllm_step import listwise_packing, rsllm_objective
from rsllm_jax.checkpoint import user_states
from rsllm_jax.train import crossfit, loop
from rsllm_jax.run_files import is_writer, write_json_atomic


# ---------------------------------------------------------------- inputs
def split_for(cfg, dataset: str) -> SplitData:
    return load_split_from_config(cfg.data, dataset)


def prompt_builder(cfg, tokenizer, split: SplitData, vocab_size: int) -> PromptBuilder:
    settings = PromptSettings(domain=DOMAIN_OF_DATASET.get(split.dataset, "movie"), use_marker=cfg.prompts.use_marker,
                              buckets=tuple(cfg.prompts.buckets), target_len=cfg.prompts.target_len,
                              chat_template=cfg.prompts.chat_template, use_titles=cfg.prompts.use_titles,
                              user_slot=bool(cfg.prompts.user_slot) and bool(cfg.prompts.use_ids))
    return PromptBuilder(tokenizer, split.titles, vocab_size, settings)


def subsample(records: list, n: int, seed: int) -> list:
    """A seeded subsample (documented in results: CPU-sized runs cannot afford every window)."""
    if not n or n >= len(records):
        return records
    idx = np.random.default_rng(seed).choice(len(records), n, replace=False)
    return [records[i] for i in sorted(idx)]


CANDIDATE_ORDERS = ("given", "sasrec")


def candidate_order(cfg, rec_table, fold_tables=None) -> SasrecOrder | None:
    """config.prompts.candidate_order -> the order object the pipelines apply (None: as sampled)."""
    order = cfg.prompts.get("candidate_order", "given")
    if order not in CANDIDATE_ORDERS:
        raise ValueError(f"config.prompts.candidate_order={order!r}: expected one of {CANDIDATE_ORDERS}")
    if order == "given":
        return None
    if rec_table is None:
        raise ValueError("config.prompts.candidate_order='sasrec' needs SASRec's item table and user states: "
                         "it is a stage-2 option (unified prompts, config.prompts.use_ids=True)")
    return SasrecOrder(rec_table, fold_tables)


def needs_user_states(cfg) -> bool:
    """The user slot, the distillation teacher and SASRec-ordered candidates read SASRec's per-window state."""
    return (bool(cfg.prompts.user_slot and cfg.prompts.use_ids) or bool(cfg.loss.weight_distill)
            or cfg.prompts.get("candidate_order", "given") == "sasrec")


def _stage_dependencies(cfg, workdir: str):
    """Stage 2 reads stage 0's item table (and user states) and stage 1's LoRA. Missing ones are trained
    before the stage by the orchestration layer (`rsllm_jax.stages.build_missing`, called by main)."""
    sasrec_dir, stage1_dir = stages.stage2_dirs(cfg, workdir)
    if not stages.stage0_ready(sasrec_dir, needs_user_states(cfg)):
        raise FileNotFoundError(f"no SASRec item table / user states in {sasrec_dir}: run stage 0 (configs/sasrec.py) "
                                "into it, set config.stage2.sasrec_dir, or start through `python -m rsllm_jax.main` "
                                "with config.stage2.build_missing=True, which trains it first")
    rec_table = np.load(os.path.join(sasrec_dir, "item_embeddings.npy"))
    stage1_params = None
    if stage1_dir is not None:
        if not has_checkpoint(stage1_dir):
            raise FileNotFoundError(f"no stage-1 checkpoint in {stage1_dir}: run configs/stage1.py into it, set "
                                    "config.stage2.stage1_dir ('none' starts from the base LLM), or start through "
                                    "`python -m rsllm_jax.main` with config.stage2.build_missing=True")
        stage1_params = restore_trainable(stage1_dir, keep=r"llm/.*lora_(a|b)|added_embeddings/.*")
    return rec_table, stage1_params, sasrec_dir


# ---------------------------------------------------------------- the run
def run_stage(cfg, workdir: str, *, llm=None) -> dict:
    """Train stage 1 or 2, then evaluate the best checkpoint on val and test. `llm` (tests) passes an
    already loaded (config, params, tokenizer)."""
    t_start = time.time()
    stage = cfg.stage
    gradient_clipping(cfg.optim.max_grad_norm, cfg.optim.get("clip_scope", "global"))  # bad scope: fail first
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    os.makedirs(workdir, exist_ok=True)
    fold_tables, crossfit_stats = None, {}

    if stage == "stage1":
        datasets = tuple(cfg.stage1.datasets)
        splits = {name: split_for(cfg, name) for name in datasets}
        rec_table, extra, num_items, use_ids = None, None, 0, False
        target = cfg.data.dataset if cfg.data.dataset in splits else datasets[0]
    elif stage == "stage2":
        rec_table, extra, sasrec_dir = _stage_dependencies(cfg, workdir)
        if is_writer():  # the eval stage finds the frozen table next to the checkpoint
            np.save(os.path.join(workdir, "item_embeddings.npy"), rec_table)
        splits = {cfg.data.dataset: split_for(cfg, cfg.data.dataset)}
        if needs_user_states(cfg):
            user_states.attach(splits[cfg.data.dataset], sasrec_dir)
            if is_writer():  # and the user states, for the eval stage
                shutil.copyfile(os.path.join(sasrec_dir, user_states.FILENAME),
                                os.path.join(workdir, user_states.FILENAME))
        if cfg.prompts.get("crossfit_folds", 0) and cfg.prompts.get("candidate_order", "given") == "sasrec":
            sp = splits[cfg.data.dataset]
            fold_tables = crossfit.attach(sp, crossfit.ensure_folds(cfg, sasrec_dir, sp))
            crossfit_stats = dict(
                crossfit_train_hr10=crossfit.train_hit_rate(sp.train, fold_tables),
                full_model_train_hr10=crossfit.train_hit_rate(sp.train, np.asarray(rec_table, np.float32)[None],
                                                              states=[r["user_state"] for r in sp.train],
                                                              folds=[0] * len(sp.train)))
            logging.info("cross-fit: training windows' HR@10 over all items (history masked), held-out fold "
                         "%.4f vs full model %.4f", crossfit_stats["crossfit_train_hr10"],
                         crossfit_stats["full_model_train_hr10"])
        target = cfg.data.dataset
        num_items, use_ids = splits[target].num_items, bool(cfg.prompts.use_ids)
    else:
        raise ValueError(f"run_stage handles stage1/stage2, not {stage!r}")

    built = build_rsllm(cfg, mesh, num_items=num_items, rec_table=rec_table, extra_params=extra, llm=llm,
                        seed=cfg.seed)
    vocab = built.model.config.llm.vocab_size
    builders = {name: prompt_builder(cfg, built.tokenizer, sp, vocab) for name, sp in splits.items()}
    (trainable, frozen), (trainable_sh, frozen_sh) = built.split()
    logging.info("%s: %d trainable / %d frozen parameters", stage, count_params(trainable), count_params(frozen))

    records = []
    for name, sp in splits.items():
        records += [dict(r, dataset=name) for r in sp.train]
    n_all = len(records)
    records = subsample(records, cfg.train.max_train_samples, cfg.seed)
    bs, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    total_steps = max(1, math.ceil(cfg.train.num_epochs * len(records) / bs))
    logging.info("%s: %d of %d training windows, batch %d (%d x %d micro), %d steps; InfoNCE pool %d (%s)", stage,
                 len(records), n_all, bs, accum, bs // accum, total_steps, nce_pool_size(cfg.loss, bs, accum),
                 cfg.loss.nce_pool)

    order = candidate_order(cfg, rec_table, fold_tables)
    example = TrainExample(
        builders, num_items={n: sp.num_items for n, sp in splits.items()}, num_candidates=cfg.data.num_candidates,
        seed=cfg.seed, batch_size=bs, use_ids=use_ids,
        curriculum_steps=total_steps if (cfg.train.curriculum and use_ids) else 0,
        distill=bool(cfg.loss.weight_distill) and use_ids, order=order, listwise=listwise_packing(cfg.loss),
    )
    data_iter = iter(train_batches(records, example, global_batch_size=bs, seed=cfg.seed,
                                   buckets=cfg.prompts.buckets, worker_count=cfg.data.grain_workers))

    tx = make_optimizer(cfg.optim, total_steps)
    lr_schedule = schedule_for(cfg.optim, total_steps)
    loss_fn = rsllm_objective(built.model, cfg.loss)  # fails here on an unknown config.loss.nce_pool
    state = step_lib.create_state(trainable, frozen, tx)
    repl = sharding.replicated(mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=trainable_sh, frozen=frozen_sh,
                                   opt_state=step_lib.opt_state_shardings(tx, trainable, mesh))
    with jax.set_mesh(mesh):
        state = jax.device_put(state, state_sh)
    rng = jax.random.key(cfg.seed)

    val_records = splits[target].val
    if cfg.train.val_samples:
        val_records = val_records[: cfg.train.val_samples]
    evaluator = Evaluator(built.model, built.tokenizer, builders[target], mesh, batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompts.eval_template,
                          use_ids=use_ids, buckets=cfg.prompts.buckets, candidate_order=order,
                          **evaluator_options(cfg))
    every = cfg.train.eval_every_steps
    if every and not evaluator.do_generate:
        raise ValueError("config.train.eval_every_steps > 0 picks the best step by generated answers' accuracy: "
                         "keep config.eval.generate=True (or set eval_every_steps=0)")
    # No periodic evaluation (0): the last step is the only candidate, evaluated in full after training.
    validation = None if not every else loop.Validation(
        due=lambda done: done % every == 0 or done == total_steps,
        run=lambda st: evaluator.run(merge(st), val_records, splits[target].titles, out_dir=None,
                                     name=f"val_step{int(st.step)}", two_tower=False),
        # Select on accuracy (hits / all): it rewards both naming one candidate and being right.
        score=lambda val: val["accuracy"],
        describe=lambda done, val: (f"step {done}: val ValidRatio {val['valid_ratio']:.3f} "
                                    f"HitRatio@1 {val['hit_ratio_at_1']:.3f}"),
    )
    jitted = {}  # compiled at the first batch (bucketed lengths differ, shardings do not)

    def llm_step(st, host_batch):
        if not jitted:
            batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in host_batch.items()}
            jitted["fn"] = step_lib.jit_train_step(loss_fn, tx, accum, state_sh, batch_sh, repl)
        # Hosts may have padded their blocks to different buckets: agree on the longest.
        host_batch = repad(host_batch, sharding.max_across_processes(host_batch["input_ids"].shape[1]))
        tokens = jax.process_count() * int(host_batch["attention_mask"].sum() + host_batch["target_attention_mask"].sum())
        st, metrics = jitted["fn"](st, sharding.global_batch(host_batch, mesh), rng)
        return st, metrics, tokens

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        outcome = loop.run(loop.Stage(
            name=stage, total_steps=total_steps, state=state, batches=data_iter, step=llm_step,
            saveable=lambda st: st.saveable(), load=functools.partial(loop.load_train_state, state_sh),
            validation=validation, guard_keys=("loss", "grad_norm"), shown=("loss", "nip", "l_ut", "l_tt"),
            item_name="tokens", desc=f"{stage}[{'+'.join(splits)}]", **loop.llm_stage_settings(cfg, lr_schedule),
        ), workdir)
    if outcome.interrupted_at is not None:
        return dict(stage=stage, interrupted_at=outcome.interrupted_at)
    state, best_step = outcome.state, outcome.best_step
    params = merge(state)
    item_cache = os.path.join(workdir, f"item_vectors_{params_fingerprint(state.trainable)}.npy")
    results = dict(stage=stage, dataset=target, eval_rows=splits[target].manifest.get("eval_rows"),
                   best_step=best_step, train_samples=len(records), train_windows_available=n_all, steps=total_steps,
                   **crossfit_stats)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for split_name in ("val", "test"):
            recs = getattr(splits[target], split_name)
            results[split_name] = evaluator.run(params, recs, splits[target].titles, out_dir=workdir, name=split_name,
                                                two_tower=cfg.eval.two_tower, item_cache=item_cache,
                                                limit=cfg.eval.max_rows)
    results.update(wall_time_s=round(time.time() - t_start, 1), train_time_s=round(outcome.train_time_s, 1))
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results


def merge(state: step_lib.TrainState) -> dict:
    return merge_trees(state.trainable, state.frozen)


def evaluator_options(cfg) -> dict:
    """The readouts config.eval picks (defaults in configs/base.py)."""
    return dict(generate=cfg.eval.generate, score_candidates=cfg.eval.score_candidates,
                max_answer_tokens=cfg.eval.max_answer_tokens, grounded=bool(cfg.eval.get("grounded", False)))


def run_eval(cfg, workdir: str, *, llm=None) -> dict:
    """Evaluate `cfg.checkpoint` (a stage-1/2 run dir; "" = the untrained model) on `cfg.eval.split`."""
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    split = split_for(cfg, cfg.data.dataset)
    text_only = cfg.checkpoint_stage == "stage1" or not cfg.prompts.use_ids
    rec_table, trained = None, None
    if not text_only:
        candidates = [os.path.join(cfg.checkpoint, "item_embeddings.npy")] if cfg.checkpoint else []
        candidates.append(os.path.join(cfg.stage2.sasrec_dir or f"runs/sasrec-{cfg.data.dataset}", "item_embeddings.npy"))
        found = [p for p in candidates if os.path.exists(p)]
        if not found:
            raise FileNotFoundError(f"no SASRec item table at {candidates}: train stage 0 or set config.stage2.sasrec_dir")
        rec_table = np.load(found[0])
    if not text_only and needs_user_states(cfg):
        dirs = ([cfg.checkpoint] if cfg.checkpoint else []) + [cfg.stage2.sasrec_dir or f"runs/sasrec-{cfg.data.dataset}"]
        found = [d for d in dirs if os.path.exists(os.path.join(d, user_states.FILENAME))]
        if not found:
            raise FileNotFoundError(f"no {user_states.FILENAME} in {dirs}: run stage 0 or set config.stage2.sasrec_dir")
        user_states.attach(split, found[0])
    if cfg.checkpoint:
        trained = restore_trainable(cfg.checkpoint)
    built = build_rsllm(cfg, mesh, num_items=0 if text_only else split.num_items, rec_table=rec_table,
                        extra_params=trained, llm=llm, seed=cfg.seed)
    builder = prompt_builder(cfg, built.tokenizer, split, built.model.config.llm.vocab_size)
    evaluator = Evaluator(built.model, built.tokenizer, builder, mesh, batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompts.eval_template,
                          use_ids=not text_only, buckets=cfg.prompts.buckets,
                          candidate_order=candidate_order(cfg, rec_table), **evaluator_options(cfg))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        metrics = evaluator.run(built.params, getattr(split, cfg.eval.split), split.titles, out_dir=workdir,
                                name=cfg.eval.split, two_tower=cfg.eval.two_tower, limit=cfg.eval.max_rows)
    metrics.update(checkpoint=cfg.checkpoint or "(untrained)", dataset=split.dataset, split=cfg.eval.split,
                   eval_rows=split.manifest.get("eval_rows"))
    write_json_atomic(os.path.join(workdir, f"metrics_{cfg.eval.split}.json"), metrics)
    return metrics
