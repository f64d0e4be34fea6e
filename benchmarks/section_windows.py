"""Section: stage-2 training windows per second on real prompts, JAX vs the PyTorch way.

The windows are the default recipe's (configs/stage2.py): MovieLens training windows rendered by the
trainer's own `TrainExample` (unified prompts, 20 candidates, the per-step template), batches of
config.train.batch_size, LoRA dropout as in training. JAX pads each batch to a length bucket
(`pad_batch`, as the trainer does; each distinct width is one compile, done before timing, and
reported); PyTorch pads each batch to its own longest row, as Hugging Face collators do (eager
PyTorch has no per-shape compile). Both train the same windows in the same order; windows/s is the
windows over the summed step times. Padding fraction = computed tokens that are padding.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import section_train, torch_reference, workload
from benchmarks.llm_setup import Setup
from rsllm_jax import sharding
from rsllm_jax.data.prompts import pad_batch
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import make_optimizer
from rsllm_jax.train.rsllm_step import rsllm_loss

# The configs' length buckets before FINE_BUCKETS replaced them: the reference row.
COARSE_BUCKETS = (256, 384, 512, 640, 768, 1024)
# Every key rsllm_loss reads (benchmarks/workload.train_batch's layout).
BATCH_KEYS = ("input_ids", "attention_mask", "slot_items", "history_mask", "answer_mask", "labels", "loss_mask",
              "target_input_ids", "target_attention_mask", "target_slot_items", "target_item", "valid")


def real_windows(tokenizer, vocab_size: int, n: int, dataset: str = "movielens", seed: int = 0) -> list[dict]:
    """`n` training windows of the default recipe, rendered exactly as the stage-2 trainer renders them."""
    from configs import stage2
    from rsllm_jax.data.prompt_pipeline import TrainExample
    from rsllm_jax.train.rsllm_trainer import prompt_builder, split_for

    cfg = stage2.get_config()
    cfg.data.dataset = dataset
    split = split_for(cfg, dataset)
    if split.num_items != workload.NUM_ITEMS:
        raise ValueError(f"{dataset} has {split.num_items} items; the benchmark's SASRec table has {workload.NUM_ITEMS}")
    builder = prompt_builder(cfg, tokenizer, split, vocab_size)
    ex = TrainExample({dataset: builder}, num_items={dataset: split.num_items}, num_candidates=cfg.data.num_candidates,
                      seed=cfg.seed, batch_size=cfg.train.batch_size, use_ids=True)
    order = np.random.default_rng(seed).permutation(len(split.train))[:n]
    return [ex(i, split.train[j]) for i, j in enumerate(order)]


def batches(windows: list[dict], batch: int, buckets) -> list[dict]:
    """Consecutive batches padded to a bucket (buckets=None: to the batch's longest row)."""
    out = []
    for i in range(0, len(windows) - batch + 1, batch):
        rows = windows[i:i + batch]
        longest = max(len(r["input_ids"]) for r in rows)
        b = pad_batch(rows, tuple(buckets) if buckets else (longest,))
        out.append({k: v for k, v in b.items() if k in BATCH_KEYS})
    return out


def padding_fraction(bs: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in bs)
    return 1 - real / sum(b["attention_mask"].size for b in bs)


def run_jax(setup: Setup, bs: list[dict]) -> dict:
    cfg, built = setup.cfg, setup.built
    (tr, fr), _ = built.split()
    tr, fr = jax.tree.map(jnp.array, (tr, fr))  # copies: the step donates its state, and each bucket set starts afresh
    tx = make_optimizer(cfg.optim, section_train.SCHEDULE_STEPS)
    state = step_lib.create_state(tr, fr, tx)
    state_sh = section_train._state_shardings(setup, state)
    repl = sharding.replicated(setup.mesh)
    batch_sh = {k: sharding.batch_sharding(setup.mesh, np.ndim(v)) for k, v in bs[0].items()}
    fn = step_lib.jit_train_step(functools.partial(rsllm_loss, built.model, cfg.loss), tx,
                                 cfg.train.grad_accum_steps, state_sh, batch_sh, repl)
    rng = jax.random.key(0)
    compiled, compile_s = {}, 0.0
    with setup.context():
        state = jax.device_put(state, state_sh)
        for b in bs:  # one compile per distinct width, outside the timed loop (the trainer pays it once)
            w = b["input_ids"].shape[1]
            if w not in compiled:
                t0 = time.perf_counter()
                compiled[w] = fn.lower(state, jax.device_put(b, batch_sh), rng).compile()
                compile_s += time.perf_counter() - t0
        times = []
        for b in bs:
            t0 = time.perf_counter()
            state, metrics = compiled[b["input_ids"].shape[1]](state, jax.device_put(b, batch_sh), rng)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    return dict(step_s=times, total_s=sum(times), compile_s=compile_s, shapes=sorted(compiled))


def run_torch(setup: Setup, bs: list[dict], autocast_bf16: bool = False) -> dict:
    """`autocast_bf16`: the PyTorch way of bf16 compute (torch.autocast: bf16 matmuls, fp32 weights)."""
    cfg, model = setup.cfg, setup.torch_model
    opt = torch.optim.AdamW(torch_reference.trainable_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    times = []
    for b in bs:
        t0 = time.perf_counter()
        tb = {k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            total, _ = model.losses(tb, cfg.loss.weight_tt, cfg.loss.weight_ut, cfg.loss.temperature)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        times.append(time.perf_counter() - t0)
    return dict(step_s=times, total_s=sum(times), torch_threads=torch.get_num_threads(),
                compute="bf16 autocast" if autocast_bf16 else "fp32")


def run(setup: Setup, windows: list[dict], *, batch: int, bucket_sets: dict[str, tuple],
        bf16_setup: Setup | None = None) -> dict:
    """JAX once per bucket set (name -> buckets), PyTorch once (each batch to its longest row). With
    `bf16_setup` (the same model built with bf16 compute), JAX again at the last bucket set in bf16, and
    PyTorch under bf16 autocast: the same job in each framework's mixed-precision way."""
    out = dict(windows=len(windows) // batch * batch, batch=batch, jax={})
    for name, buckets in bucket_sets.items():
        bs = batches(windows, batch, buckets)
        r = run_jax(setup, bs)
        r.update(windows_per_s=out["windows"] / r["total_s"], padding_fraction=padding_fraction(bs),
                 buckets=list(buckets), compute="fp32")
        out["jax"][name] = r
    if bf16_setup is not None:
        bs = batches(windows, batch, buckets)
        r = run_jax(bf16_setup, bs)
        r.update(windows_per_s=out["windows"] / r["total_s"], padding_fraction=padding_fraction(bs),
                 buckets=list(buckets), compute="bf16 matmuls, fp32 master weights")
        out["jax"][f"{name}, bf16"] = r
    bs = batches(windows, batch, None)
    r = run_torch(setup, bs)
    r.update(windows_per_s=out["windows"] / r["total_s"], padding_fraction=padding_fraction(bs))
    out["torch"] = r
    if bf16_setup is not None:
        r = run_torch(setup, bs, autocast_bf16=True)
        r.update(windows_per_s=out["windows"] / r["total_s"], padding_fraction=padding_fraction(bs))
        out["torch_bf16"] = r
    return out
