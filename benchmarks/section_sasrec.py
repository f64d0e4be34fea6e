"""Section 3: one SASRec training epoch, rsllm_jax (models/sasrec.py + train/sasrec_step.py, jitted and
sharded as train/sasrec_trainer.py does) vs a plain PyTorch SASRec of the same size.

Both consume the same precomputed epoch of batches (SasrecWindows + SasrecNegatives seq/pos/neg windows, one
sampled negative per position), so only the model, loss, backward and Adam update are timed; the
data pipeline is not. Windows come from the real MovieLens split when it is available
($RSLLM_DATA_DIR), else from split-shaped synthetic records.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from absl import logging

from benchmarks import flops, timing, workload
from benchmarks.torch_sasrec import TorchSASRec
from configs import sasrec as sasrec_config
from rsllm_jax import sharding
from rsllm_jax.data.sasrec_batches import SasrecNegatives, SasrecWindows
from rsllm_jax.data.splits import load_split_from_config
from rsllm_jax.models.sasrec import SASRec, SASRecConfig
from rsllm_jax.train.sasrec_step import train_step


def load_records(source: str, synthetic_samples: int, cfg) -> tuple[str, list[dict], int]:
    """(description, train records, num_items). source: movielens | synthetic | auto."""
    if source in ("movielens", "auto") and (source == "movielens" or os.environ.get("RSLLM_DATA_DIR")):
        try:
            split = load_split_from_config(cfg.data, "movielens")
            return "movielens train split", split.train, split.num_items
        except Exception as e:  # 'auto' falls back; an explicit request fails loudly
            if source == "movielens":
                raise
            logging.warning("MovieLens split unavailable (%s): using synthetic windows", e)
    return "synthetic", workload.synthetic_sasrec_records(synthetic_samples), workload.NUM_ITEMS


def epoch_batches(records: list[dict], num_items: int, max_len: int, batch: int, seed: int = 0) -> list[dict]:
    """One epoch of {seq, pos, neg} int32 [batch, max_len] batches (drop remainder, as the trainer)."""
    windows, negatives = SasrecWindows(num_items, max_len), SasrecNegatives(num_items)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records))
    rows = [windows.map(records[i]) for i in order[: len(records) // batch * batch]]
    return [negatives.random_map({k: np.stack([r[k] for r in rows[s: s + batch]]) for k in ("seq", "pos")}, rng)
            for s in range(0, len(rows), batch)]


def run_jax(cfg, mcfg: SASRecConfig, batches: list[dict], epochs: int, warmup: int) -> dict:
    model = SASRec(mcfg)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    repl = sharding.replicated(mesh)
    tx = optax.adamw(cfg.sasrec.lr, b1=0.9, b2=0.98, weight_decay=cfg.sasrec.weight_decay)

    def init_state(rng):
        params = model.init(rng, jnp.full((1, mcfg.max_len), mcfg.pad_id, jnp.int32))["params"]
        return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    rng = jax.random.key(0)
    state_sh = jax.tree.map(lambda _: repl, jax.eval_shape(init_state, rng))
    batch_sh = {k: sharding.batch_sharding(mesh) for k in ("seq", "pos", "neg")}
    step_fn = jax.jit(functools.partial(train_step, model, tx, "bce"), in_shardings=(state_sh, batch_sh, repl),
                      out_shardings=(state_sh, repl), donate_argnums=0)
    box = {"state": jax.jit(init_state, out_shardings=state_sh)(rng)}
    with jax.set_mesh(mesh):
        compile_s, compiled = timing.timed(
            lambda: step_fn.lower(box["state"], sharding.global_batch(batches[0], mesh), rng).compile())

        def epoch():
            for b in batches:
                box["state"], metrics = compiled(box["state"], sharding.global_batch(b, mesh), rng)
            box["loss"] = float(jax.block_until_ready(metrics)["loss"])

        times = timing.repeat(epoch, repeats=epochs, warmup=warmup)
    return dict(**times, compile_s=compile_s, last_step_loss=box["loss"])


def run_torch(cfg, mcfg: SASRecConfig, batches: list[dict], epochs: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = TorchSASRec(mcfg.num_items, mcfg.max_len, mcfg.hidden, mcfg.num_blocks, mcfg.num_heads, mcfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sasrec.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.sasrec.weight_decay)
    model.train()

    def epoch():
        for b in batches:
            t = {k: torch.from_numpy(v).long() for k, v in b.items()}
            opt.zero_grad(set_to_none=True)
            loss = model.bce_loss(t["seq"], t["pos"], t["neg"])
            loss.backward()
            opt.step()
        box["loss"] = float(loss.detach())

    box = {}
    times = timing.repeat(epoch, repeats=epochs, warmup=warmup)
    return dict(**times, last_step_loss=box["loss"], torch_threads=torch.get_num_threads())


def run(*, source: str, synthetic_samples: int, batch: int, epochs: int, warmup: int) -> dict:
    cfg = sasrec_config.get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    desc, records, num_items = load_records(source, synthetic_samples, cfg)
    mcfg = SASRecConfig(num_items=num_items, max_len=cfg.data.max_history, hidden=cfg.sasrec.hidden,
                        num_blocks=cfg.sasrec.num_blocks, num_heads=cfg.sasrec.num_heads, dropout=cfg.sasrec.dropout)
    batches = epoch_batches(records, num_items, mcfg.max_len, batch)
    if not batches:
        raise ValueError(f"{len(records)} SASRec records make no batch of {batch}")
    # Warm-up epochs are not timed (the JAX compile is reported separately); both get the same number.
    jax_res = run_jax(cfg, mcfg, batches, epochs, warmup)
    torch_res = run_torch(cfg, mcfg, batches, epochs, warmup)
    samples = len(batches) * batch
    for r in (jax_res, torch_res):
        r["samples_per_s"] = samples / r["median_s"]
    step_flops = flops.sasrec_step_flops(mcfg.hidden, mcfg.num_blocks, mcfg.max_len, batch)
    return dict(
        jax=jax_res, torch=torch_res, data=desc, samples_per_epoch=samples, steps_per_epoch=len(batches),
        model_flops_per_epoch=step_flops * len(batches),
        shape=dict(batch=batch, max_len=mcfg.max_len, hidden=mcfg.hidden, blocks=mcfg.num_blocks,
                   heads=mcfg.num_heads, num_items=num_items, loss="bce, one sampled negative"),
        speedup=torch_res["median_s"] / jax_res["median_s"],
    )
