"""P2Rec information reconstruction (user-level SFT): the LLM learns to read a user's preference
distribution from the titles of their sequence.

Target (ours, from the abstract's "preference parsing"): cluster the pretrained SASRec's item table
into K latent categories (k-means); a user's prior = SASRec's next-item softmax after their sequence,
summed per category. One example per training user (the sequence of their last training window); the
LLM reads it as a short prompt of titles, a Dense(K) head on the masked-mean-pooled last hidden state
predicts the K-way distribution, loss = KL(prior || softmax(head)). LoRA + head are trained through the
project's sharded step; the best step is chosen by validation KL (val users read their history).

Outputs under the workdir: metrics.jsonl, checkpoints/ + best/ (orbax: LoRA + head + optimizer state,
Grain iterator), categories.npz (assignments, centroids), results.json.
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rsllm_jax import sharding
from rsllm_jax.checkpoint.run_dirs import has_checkpoint, sibling_dir
from rsllm_jax.data import pipeline
from rsllm_jax.data.sasrec_batches import left_pad
from rsllm_jax.data.splits import load_split_from_config
from rsllm_jax.models.lora import merge_trees, split_trainable
from rsllm_jax.models.sasrec import SASRec, item_table
from rsllm_jax.checkpoint.run_dirs import restore_subtree
from rsllm_jax.p2rec.common import (
    TitlePrompts, pooled_states, run_batched, sasrec_config_from_params,
)
from rsllm_jax.train import step as step_lib
from rsllm_jax.train import loop
from rsllm_jax.train.optimizer import count_params, make_optimizer, schedule_for
from rsllm_jax.train.rsllm_setup import build_rsllm
from rsllm_jax.train.rsllm_trainer import subsample
from rsllm_jax.run_files import is_writer, write_json_atomic

HEAD = "p2rec_head"  # the head's subtree next to the RSLLM tree (llm/, added_embeddings/)
USER_SEQUENCES = ("full", "history")


# ---------------------------------------------------------------- pure pieces
def kmeans(x: np.ndarray, k: int, *, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm with k-means++ seeding -> (centroids [k, D], assignments [N]).

    Deterministic for a seed. An emptied cluster is re-seeded with the point farthest from its
    centroid. The returned assignment is each point's nearest returned centroid."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"config.p2rec.num_categories={k} must be in [1, {n}] (the number of items)")
    rng = np.random.default_rng(seed)

    def sq_dist(c):  # [N, k]
        return np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None], 0.0)

    centroids = [x[rng.integers(n)]]
    d2 = sq_dist(np.asarray(centroids))[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centroids.append(x[idx])
        d2 = np.minimum(d2, sq_dist(x[idx][None])[:, 0])
    c = np.asarray(centroids)
    for _ in range(iters):
        d = sq_dist(c)
        assign = d.argmin(1)
        new = c.copy()
        for j in range(k):
            members = assign == j
            if members.any():
                new[j] = x[members].mean(0)
            else:
                far = int(d[np.arange(n), assign].argmax())
                new[j] = x[far]
                assign[far] = j
        if np.allclose(new, c, rtol=0.0, atol=1e-10):
            c = new
            break
        c = new
    return c.astype(np.float32), sq_dist(c).argmin(1)


def category_prior(probs, assignments, num_categories: int):
    """Per-category probability mass: probs [B, N] (rows sum to 1), assignments [N] -> [B, K]."""
    return probs @ jax.nn.one_hot(assignments, num_categories, dtype=probs.dtype)


def kl_to_prior(prior, logits, valid=None):
    """Mean over valid rows of KL(prior || softmax(logits)), fp32; terms with prior 0 contribute 0."""
    prior = jnp.asarray(prior, jnp.float32)
    log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    per_row = jnp.sum(jax.scipy.special.xlogy(prior, prior) - prior * log_q, axis=-1)
    w = jnp.ones(per_row.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def user_sequences(records: Sequence[dict], mode: str, max_len: int) -> list[tuple[str, list[int]]]:
    """One (user, sequence) per user, from the user's last record (the split keeps each user's windows in
    time order). 'full': the last window's history + its target; 'history': the history alone."""
    if mode not in USER_SEQUENCES:
        raise ValueError(f"config.p2rec.user_sequence must be one of {USER_SEQUENCES}, got {mode!r}")
    last: dict[str, dict] = {}
    for i, r in enumerate(records):
        if "user" not in r:
            raise ValueError(f"split record {i} has no 'user' field: P2Rec needs one example per user")
        last[str(r["user"])] = r
    out = []
    for user, r in last.items():
        seq = list(r["history"]) + ([int(r["target"])] if mode == "full" else [])
        out.append((user, [int(i) for i in seq[-max_len:]]))
    return out


class PreferenceHead(nn.Module):
    """Dense(K) over the pooled LLM state, fp32: logits of the K-way preference distribution."""

    num_categories: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        return nn.Dense(self.num_categories, dtype=jnp.float32, param_dtype=jnp.float32, name="dense")(
            pooled.astype(jnp.float32))


def _llm_part(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != HEAD}


def preference_logits(model, head: PreferenceHead, params, batch, *, deterministic=True, rng=None):
    """Head logits [B, K] for a batch of prompts; `params` = RSLLM tree + the head subtree."""
    pooled = pooled_states(model, _llm_part(params), batch["input_ids"], batch["attention_mask"], batch["pool_mask"],
                           deterministic=deterministic, rng=rng)
    return head.apply({"params": params[HEAD]}, pooled)


def reconstruct_loss(model, head: PreferenceHead, trainable, frozen, batch, rng):
    """The `loss_fn` for train/step.py: KL(prior || head(pooled LLM state))."""
    params = merge_trees(trainable, frozen)
    logits = preference_logits(model, head, params, batch, deterministic=False, rng=rng)
    kl = kl_to_prior(batch["prior"], logits)
    agree = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(batch["prior"], -1)).astype(jnp.float32))
    return kl, dict(loss=kl, top1_agree=agree)


# ---------------------------------------------------------------- SASRec side
def sasrec_priors(params, sequences: Sequence[Sequence[int]], assignments: np.ndarray, num_categories: int,
                  temperature: float = 1.0, batch_size: int = 256) -> np.ndarray:
    """Category priors [U, K] from SASRec's next-item softmax after each sequence (one device: SASRec is small)."""
    if temperature <= 0:
        raise ValueError(f"config.p2rec.prior_temperature must be > 0 (or 0 = calibrated), got {temperature}")
    mcfg = sasrec_config_from_params(params)
    seqs = np.stack([left_pad(s, mcfg.max_len, mcfg.pad_id) for s in sequences])
    fn = _prior_fn(mcfg, num_categories)
    assign = jnp.asarray(assignments, jnp.int32)
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        pad = batch_size - len(chunk)  # one compiled shape
        batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(fn(params, batch, assign, jnp.float32(temperature)))[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _prior_fn(mcfg, num_categories: int):
    """Jitted (params, seq, assignments, temperature) -> category priors; the temperature is traced, so a
    calibration sweep compiles once."""
    model = SASRec(mcfg)

    @jax.jit
    def prior(p, seq, assign, temperature):
        states = model.apply({"params": p}, seq)[:, -1]
        logits = model.apply({"params": p}, states, method=SASRec.score_all)
        return category_prior(jax.nn.softmax(logits / temperature, axis=-1), assign, num_categories)
    return prior


CALIBRATION_GRID = tuple(float(t) for t in np.geomspace(0.1, 100.0, 31))


def calibrate_temperature(params, histories: Sequence[Sequence[int]], targets: Sequence[int],
                          assignments: np.ndarray, num_categories: int,
                          grid: Sequence[float] = CALIBRATION_GRID) -> tuple[float, list[dict]]:
    """Temperature scaling of SASRec's logits for the category prior: the T on `grid` that minimises the
    negative log-likelihood of the observed next item's category, -log prior_T(cat(target) | history).

    Why: a BCE-trained SASRec's logits have no softmax scale; at T = 1 its next-item softmax can be almost
    one-hot (then every prior is one category and KL(prior || q) punishes any hedging)."""
    cats = np.asarray(assignments)[np.asarray(targets, np.int64)]
    table = []
    for t in grid:
        priors = sasrec_priors(params, histories, assignments, num_categories, t)
        hit = priors[np.arange(len(cats)), cats]
        table.append(dict(temperature=t, nll=float(-np.mean(np.log(np.maximum(hit, 1e-12)))),
                          mean_entropy=_mean_entropy(priors)))
    best = min(table, key=lambda row: row["nll"])
    return best["temperature"], table


def calibrate_on_training_users(params, train_records: Sequence[dict], assignments: np.ndarray, num_categories: int,
                                max_history: int) -> tuple[float, list[dict]]:
    """`calibrate_temperature` on every training user's last window (its history -> its target)."""
    windows = [s for _, s in user_sequences(train_records, "full", max_history + 1)]
    return calibrate_temperature(params, [w[:-1] for w in windows], [w[-1] for w in windows], assignments,
                                 num_categories)


def _mean_entropy(priors: np.ndarray) -> float:
    return float(np.mean(-(priors * np.log(np.maximum(priors, 1e-12))).sum(1)))


def load_sasrec(cfg, workdir: str):
    """(run dir, params) of the pretrained SASRec (trained first by `stages.build_missing` when missing)."""
    sasrec_dir = sibling_dir(cfg.p2rec.sasrec_dir, workdir, f"sasrec-{cfg.data.dataset}")
    if not has_checkpoint(sasrec_dir):
        raise FileNotFoundError(f"no SASRec checkpoint in {sasrec_dir}: run configs/sasrec.py into it, set "
                                "config.p2rec.sasrec_dir, or start through `python -m rsllm_jax.main` with "
                                "config.p2rec.build_missing=True, which trains it first")
    params, _ = restore_subtree(sasrec_dir, "params")
    return sasrec_dir, params


class _Arrays(grain.transforms.Map):
    """Examples are encoded up front; the pipeline only shuffles and batches them."""

    def map(self, record: dict) -> dict:
        return record


# ---------------------------------------------------------------- the run
def run_reconstruct(cfg, workdir: str, *, llm=None) -> dict:
    """Train LoRA + head on the reconstruction task; `llm` (tests) is a loaded (config, params, tokenizer)."""
    t_start = time.time()
    p = cfg.p2rec
    os.makedirs(workdir, exist_ok=True)
    split = load_split_from_config(cfg.data)
    sasrec_dir, sasrec_params = load_sasrec(cfg, workdir)
    if sasrec_config_from_params(sasrec_params).num_items != split.num_items:
        raise ValueError(f"SASRec in {sasrec_dir} has {sasrec_config_from_params(sasrec_params).num_items} items, "
                         f"dataset {split.dataset} has {split.num_items}: config.p2rec.sasrec_dir is for another dataset")

    # Latent categories of SASRec's item space, and each user's prior over them.
    num_cat = p.num_categories
    table = np.asarray(item_table(sasrec_params), np.float32)
    centroids, assign = kmeans(table, num_cat, iters=p.kmeans_iters, seed=p.kmeans_seed)
    sizes = np.bincount(assign, minlength=num_cat)
    if is_writer():
        np.savez(os.path.join(workdir, "categories.npz"), assignments=assign, centroids=centroids)
    train_users = user_sequences(split.train, p.user_sequence, cfg.data.max_history)
    n_all_users = len(train_users)
    train_users = subsample(train_users, p.max_users, cfg.seed)
    val_users = [(str(r.get("user", i)), list(r["history"])[-cfg.data.max_history:]) for i, r in enumerate(split.val)]
    temperature, calibration = p.prior_temperature, None
    if temperature == 0:
        temperature, calibration = calibrate_on_training_users(sasrec_params, split.train, assign, num_cat,
                                                               cfg.data.max_history)
        logging.info("p2rec reconstruct: calibrated prior temperature %.3g (category NLL %.4f; T=1: %.4f)",
                     temperature, min(r["nll"] for r in calibration),
                     min(calibration, key=lambda r: abs(math.log(r["temperature"])))["nll"])
    train_prior = sasrec_priors(sasrec_params, [s for _, s in train_users], assign, num_cat, temperature)
    val_prior = sasrec_priors(sasrec_params, [s for _, s in val_users], assign, num_cat, temperature)
    logging.info("p2rec reconstruct: %d categories (sizes %d..%d), %d of %d train users, %d val users", num_cat,
                 sizes.min(), sizes.max(), len(train_users), n_all_users, len(val_users))

    # The LLM (+ LoRA) and the head, as one sharded tree.
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    repl = sharding.replicated(mesh)
    built = build_rsllm(cfg, mesh, llm=llm, seed=cfg.seed)
    head = PreferenceHead(num_cat)
    head_params = head.init(jax.random.key(cfg.seed + 1), jnp.zeros((1, built.model.config.llm.hidden_size)))["params"]
    params = dict(built.params, **{HEAD: jax.device_put(head_params, repl)})
    shardings = dict(built.shardings, **{HEAD: jax.tree.map(lambda _: repl, head_params)})
    trainable, frozen = split_trainable(params, cfg.trainable)
    trainable_sh, frozen_sh = split_trainable(shardings, cfg.trainable)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"config.trainable={tuple(cfg.trainable)} selects no parameter of the reconstruction model")
    logging.info("p2rec reconstruct: %d trainable / %d frozen parameters", count_params(trainable), count_params(frozen))

    prompts = TitlePrompts(built.tokenizer, split.titles, p.user_prompt, "history", name="user_prompt",
                           max_title_tokens=p.max_title_tokens, pool=p.pool)
    enc = prompts.batch([s for _, s in train_users] + [s for _, s in val_users])
    n_train = len(train_users)
    train_arrays = {k: v[:n_train] for k, v in enc.items()}
    val_arrays = {k: v[n_train:] for k, v in enc.items()}
    examples = [dict({k: v[i] for k, v in train_arrays.items()}, prior=train_prior[i]) for i in range(n_train)]

    bs, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    total_steps = max(1, math.ceil(cfg.train.num_epochs * n_train / bs))
    data_iter = iter(pipeline.train_dataset(examples, _Arrays(), global_batch_size=bs, seed=cfg.seed,
                                            worker_count=cfg.data.grain_workers))
    tx = make_optimizer(cfg.optim, total_steps)
    lr_schedule = schedule_for(cfg.optim, total_steps)
    loss_fn = functools.partial(reconstruct_loss, built.model, head)
    state = step_lib.create_state(trainable, frozen, tx)
    state_sh = step_lib.TrainState(step=repl, trainable=trainable_sh, frozen=frozen_sh,
                                   opt_state=step_lib.opt_state_shardings(tx, trainable, mesh))
    with jax.set_mesh(mesh):
        state = jax.device_put(state, state_sh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in ("input_ids", "attention_mask", "pool_mask", "prior")}
    step_fn = step_lib.jit_train_step(loss_fn, tx, accum, state_sh, batch_sh, repl)
    rng = jax.random.key(cfg.seed)

    eval_logits = jax.jit(functools.partial(preference_logits, built.model, head))

    def validate(st) -> dict:
        merged = merge_trees(st.trainable, st.frozen)
        logits = run_batched(lambda **b: eval_logits(merged, b), val_arrays, p.embed_batch_size, mesh)
        return dict(kl=float(kl_to_prior(val_prior, logits)), n=len(val_users),
                    top1_agree=float(np.mean(logits.argmax(-1) == val_prior.argmax(-1))))

    def reconstruct_step(st, host_batch):
        st, metrics = step_fn(st, sharding.global_batch(host_batch, mesh), rng)
        return st, metrics, bs

    every = cfg.train.eval_every_steps
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        outcome = loop.run(loop.Stage(
            name="p2rec reconstruct", total_steps=total_steps, state=state, batches=data_iter, step=reconstruct_step,
            saveable=lambda st: st.saveable(), load=functools.partial(loop.load_train_state, state_sh),
            # Validated every `eval_every_steps` (0: only at the end); the best is the lowest val KL.
            validation=loop.Validation(
                due=lambda done: bool(every and done % every == 0) or done == total_steps,
                run=validate, score=lambda val: -val["kl"],
                describe=lambda done, val: (f"step {done}: val KL {val['kl']:.4f} top-1 category agreement "
                                            f"{val['top1_agree']:.3f}")),
            item_name="users", desc=f"p2rec_reconstruct[{split.dataset}]", **loop.llm_stage_settings(cfg, lr_schedule),
        ), workdir)
    if outcome.interrupted_at is not None:  # simulated preemption (config.train.stop_after_steps): run again
        return dict(stage="p2rec_reconstruct", interrupted_at=outcome.interrupted_at)
    state, best_step = outcome.state, outcome.best_step
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        val = validate(state)
    # Reference points: predicting uniform, or every user's prior as the mean training prior.
    mean_prior = np.log(np.maximum(train_prior.mean(0), 1e-12))
    baselines = dict(kl_uniform=float(kl_to_prior(val_prior, np.zeros_like(val_prior))),
                     kl_train_mean=float(kl_to_prior(val_prior, np.broadcast_to(mean_prior, val_prior.shape))),
                     top1_agree_train_mean=float(np.mean(val_prior.argmax(-1) == mean_prior.argmax())))
    results = dict(
        stage="p2rec_reconstruct", dataset=split.dataset, sasrec_dir=os.path.abspath(sasrec_dir),
        num_categories=num_cat, category_sizes=sizes.tolist(), user_sequence=p.user_sequence,
        train_users=n_train, train_users_available=n_all_users, steps=total_steps,
        best_step=best_step, val=val, val_baselines=baselines,
        prior_temperature=temperature, temperature_calibration=calibration,
        prior_mean_entropy=dict(train=_mean_entropy(train_prior), val=_mean_entropy(val_prior)),
        wall_time_s=round(time.time() - t_start, 1), train_time_s=round(outcome.train_time_s, 1),
    )
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    logging.info("p2rec reconstruct %s: val %s (baselines %s)", split.dataset, val, baselines)
    return results
