"""Section 1: the stage-2 train step (NIP + L_UT + L_TT, LoRA, projector, Adam), JAX vs PyTorch.

JAX runs the project's own step: build_rsllm -> split -> make_optimizer -> create_state ->
jit_train_step(rsllm_loss) with explicit shardings on a 1-device mesh, exactly as the trainer and
tests/test_rsllm_step.py do. PyTorch runs torch_reference.TorchRSLLM with the same weights, batch,
losses, global-norm clipping, AdamW groups and learning-rate schedule. Each timed step includes the
host->device copy of the batch (the trainer does that every step too).
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from benchmarks import flops, timing, torch_reference, workload
from benchmarks.llm_setup import Setup
from rsllm_jax import sharding
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from rsllm_jax.train.rsllm_step import rsllm_loss

SCHEDULE_STEPS = 1000  # the LR schedule's horizon; only its shape, not its length, costs time
LOSS_KEYS = ("loss", "nip", "l_ut", "l_tt")
# fp32 on both sides: identical weights and inputs leave only summation-order differences.
LOSS_ATOL, LOSS_RTOL = 1e-3, 1e-3
GRAD_NORM_RTOL = 1e-2  # a looser check that the backward passes agree too


def _state_shardings(setup: Setup, state):
    (_, _), (tr_sh, fr_sh) = setup.built.split()
    repl = sharding.replicated(setup.mesh)
    return step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh,
                               opt_state=jax.tree.map(lambda _: repl, state.opt_state))


def _xla_flops(compiled) -> float | None:
    """XLA's own FLOP count of the compiled step (a cross-check of flops.py), when it reports one."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - optional diagnostics
        return None


def run_jax(setup: Setup, batch: dict, repeats: int, warmup: int) -> dict:
    cfg, built = setup.cfg, setup.built
    (tr, fr), _ = built.split()
    tx = make_optimizer(cfg.optim, SCHEDULE_STEPS)
    state = step_lib.create_state(tr, fr, tx)
    state_sh = _state_shardings(setup, state)
    repl = sharding.replicated(setup.mesh)
    batch_sh = {k: sharding.batch_sharding(setup.mesh, np.ndim(v)) for k, v in batch.items()}
    fn = step_lib.jit_train_step(functools.partial(rsllm_loss, built.model, cfg.loss), tx,
                                 cfg.train.grad_accum_steps, state_sh, batch_sh, repl)
    rng = jax.random.key(0)
    with setup.context():
        state = jax.device_put(state, state_sh)
        times, compiled = timing.time_train_step(fn, state, batch, batch_sh, rng, repeats=repeats, warmup=warmup)
    return dict(**times, xla_flops_per_step=_xla_flops(compiled),
                xla_flops_note="XLA cost_analysis of the compiled step, for comparison with model_flops_per_step: "
                               "it also counts elementwise ops and the projector at every position, and counts "
                               "a scanned layer stack's loop body once")


def run_torch(setup: Setup, batch: dict, repeats: int, warmup: int) -> dict:
    cfg, model = setup.cfg, setup.torch_model
    opt = torch.optim.AdamW(torch_reference.trainable_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
    # The same warm-up + cosine values optax uses, as multipliers of the peak rate.
    lrs = np.asarray(learning_rate_schedule(cfg.optim.lr, SCHEDULE_STEPS, cfg.optim.warmup_fraction,
                                            cfg.optim.min_lr_ratio)(np.arange(SCHEDULE_STEPS + 1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lrs[min(s, SCHEDULE_STEPS)]) / cfg.optim.lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_cfg = cfg.loss
    model.train()

    def step():
        tb = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        total, metrics = model.losses(tb, loss_cfg.weight_tt, loss_cfg.weight_ut, loss_cfg.temperature)
        total.backward()
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        return {k: float(v.detach()) for k, v in metrics.items()}

    first_s, first = timing.timed(step)
    times = timing.repeat(step, repeats=repeats, warmup=warmup)
    return dict(**times, first_step_s=first_s, first_step=first, torch_threads=torch.get_num_threads(),
                attn_implementation=model.base.config._attn_implementation)


def compare_losses(jax_first: dict, torch_first: dict, dropout: float = 0.0) -> dict:
    """First-step losses (before any update, so the weights are identical) and gradient norms. With
    dropout the two frameworks draw different masks: reported, not checked (`agree` is None)."""
    out = {}
    for k in LOSS_KEYS:
        a, b = jax_first[k], torch_first[k]
        out[k] = dict(jax=a, torch=b, abs_diff=abs(a - b), ok=abs(a - b) <= LOSS_ATOL + LOSS_RTOL * abs(b))
    a, b = jax_first["grad_norm"], torch_first["grad_norm"]
    out["grad_norm"] = dict(jax=a, torch=b, abs_diff=abs(a - b), ok=abs(a - b) <= GRAD_NORM_RTOL * abs(b) + 1e-6)
    out["tolerance"] = (f"losses |jax-torch| <= {LOSS_ATOL} + {LOSS_RTOL}*|torch|; grad_norm rel {GRAD_NORM_RTOL}; "
                        "fp32, dropout off, LoRA A copied and B = 0 on both sides")
    out["agree"] = all(out[k]["ok"] for k in LOSS_KEYS)
    if dropout:
        out["tolerance"] = f"not compared: LoRA dropout {dropout} draws different masks in each framework"
        out["agree"] = None
        for k in (*LOSS_KEYS, "grad_norm"):
            out[k]["ok"] = None
    return out


def run(setup: Setup, *, batch: int, seq_len: int, target_len: int, repeats: int, warmup: int) -> dict:
    vocab = setup.built.model.config.llm.vocab_size
    data = workload.train_batch(batch=batch, seq_len=seq_len, target_len=target_len, vocab=vocab)
    lora = setup.built.model.lora
    counts = flops.llm_counts(setup.built.model.config.llm, lora.rank, lora.targets, workload.REC_DIM)
    slots = int((data["slot_items"] >= 0).sum() + (data["target_slot_items"] >= 0).sum())
    step_flops = flops.train_step_flops(counts, batch, seq_len, target_len, slots)
    jax_res = run_jax(setup, data, repeats, warmup)
    torch_res = run_torch(setup, data, repeats, warmup)
    tokens = batch * (seq_len + target_len)  # both passes are processed every step
    for r in (jax_res, torch_res):
        r["tokens_per_s"] = tokens / r["median_s"]
        r["main_tokens_per_s"] = batch * seq_len / r["median_s"]
    return dict(
        jax=jax_res, torch=torch_res, losses=compare_losses(jax_res["first_step"], torch_res["first_step"], setup.cfg.lora.dropout),
        model_flops_per_step=step_flops, tokens_per_step=tokens, id_slots_per_step=slots,
        shape=dict(batch=batch, seq_len=seq_len, target_len=target_len),
        counts=dict(N=counts.n, N_head=counts.n_head, N_lora=counts.n_lora, N_proj=counts.n_proj),
        speedup=torch_res["median_s"] / jax_res["median_s"],
    )
