"""What the step-wide InfoNCE pool costs: the stage-2 train step with config.loss.nce_pool = micro_batch vs step.

    python -m benchmarks.nce_pool --out=runs/bench_pool [--model=smollm2] [--batch=8] [--accum=4] [--seq_len=256]

Both variants run the project's own jitted step (train/step.py) on the same weights and synthetic batch
(benchmarks/workload.py), gradient accumulation over `--accum` micro-batches, one device. "step" adds a
forward-only pass over every micro-batch (GradCache), so its extra cost should be about one forward, i.e.
~1/3 of a forward + backward; its memory should stay that of one micro-batch (XLA's temp bytes of the
compiled step). This compares two options of this code base; there is no PyTorch/transformers counterpart
of the option to time against (benchmarks.run times the step itself against PyTorch).
Prints a table and writes <out>/nce_pool.{json,md}.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import llm_setup, timing, workload
from rsllm_jax import sharding
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import make_optimizer
from rsllm_jax.train.rsllm_setup import build_rsllm
from rsllm_jax.train.nce_pool import nce_pool_size
from rsllm_jax.train.rsllm_step import rsllm_objective

_OUT = flags.DEFINE_string("out", "runs/bench_pool", "Directory for nce_pool.json and nce_pool.md")
_MODEL = flags.DEFINE_string("model", "smollm2", "'smollm2', a .gguf file or a Hugging Face LLaMA checkpoint dir")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per train step (the whole step's batch)")
_ACCUM = flags.DEFINE_integer("accum", 4, "Micro-batches per step (grad_accum_steps)")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row of the main pass")
_TARGET = flags.DEFINE_integer("target_len", 24, "Tokens per row of the second tower (target item alone)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per variant")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps per variant after the compiling one")

POOLS = ("micro_batch", "step")


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def run_variant(llm, pool: str, batch: dict) -> dict:
    cfg = llm_setup.stage2_config(scan_layers=True, target_len=_TARGET.value)
    cfg.train.grad_accum_steps = _ACCUM.value
    cfg.loss.nce_pool = pool
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(cfg.mesh.rules)
    table = workload.rec_table()
    built = build_rsllm(cfg, mesh, num_items=table.shape[0], rec_table=table, llm=llm)
    (tr, fr), (tr_sh, fr_sh) = built.split()
    tx = make_optimizer(cfg.optim, 1000)
    state = step_lib.create_state(tr, fr, tx)
    repl = sharding.replicated(mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh,
                                   opt_state=jax.tree.map(lambda _: repl, state.opt_state))
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    fn = step_lib.jit_train_step(rsllm_objective(built.model, cfg.loss), tx, _ACCUM.value, state_sh, batch_sh, repl)
    rng = jax.random.key(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # what the trainer wraps its steps in
        state = jax.device_put(state, state_sh)
        times, compiled = timing.time_train_step(fn, state, batch, batch_sh, rng, repeats=_REPEATS.value,
                                                 warmup=_WARMUP.value)
    tokens = _BATCH.value * (_SEQ.value + _TARGET.value)
    return dict(pool=pool, pool_size=nce_pool_size(cfg.loss, _BATCH.value, _ACCUM.value), **times,
                tokens_per_s=tokens / times["median_s"], temp_bytes=_temp_bytes(compiled))


def markdown(out: dict) -> str:
    s = out["setup"]
    lines = [f"Stage-2 train step, {s['model']}, batch {s['batch']} = {s['accum']} micro-batches of "
             f"{s['batch'] // s['accum']}, {s['seq_len']} + {s['target_len']} tokens per row, fp32, 1 device "
             f"({s['jax_device']}, {s['cpu_count']} CPUs), {s['date']}.", "",
             "| InfoNCE pool | rows per InfoNCE term | median s / step | min s | tokens/s | vs micro_batch "
             "| XLA temp MiB | compile s | first-step L_UT | first-step L_TT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = out["variants"][0]["median_s"]
    for v in out["variants"]:
        mib = "—" if v["temp_bytes"] is None else f"{v['temp_bytes'] / 2**20:.0f}"
        lines.append(f"| `{v['pool']}` | {v['pool_size']} | {v['median_s']:.2f} | {v['min_s']:.2f} | "
                     f"{v['tokens_per_s']:.0f} | {v['median_s'] / base:.2f}x | {mib} | {v['compile_s']:.1f} | "
                     f"{v['first_step']['l_ut']:.3f} | {v['first_step']['l_tt']:.3f} |")
    if s.get("busy_warning"):
        lines += ["", f"Warning: {s['busy_warning']}."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if _BATCH.value % _ACCUM.value:
        raise app.UsageError(f"--batch={_BATCH.value} is not divisible by --accum={_ACCUM.value}")
    llm = llm_setup.load(_MODEL.value, scan_layers=True)
    batch = workload.train_batch(batch=_BATCH.value, seq_len=_SEQ.value, target_len=_TARGET.value,
                                 vocab=llm[0].vocab_size)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    setup = dict(model=_MODEL.value, batch=_BATCH.value, accum=_ACCUM.value, seq_len=_SEQ.value,
                 target_len=_TARGET.value, repeats=_REPEATS.value, warmup=_WARMUP.value, jax=jax.__version__,
                 jax_device=str(jax.devices()[0]), cpu_count=cpus, machine=platform.machine(),
                 date=datetime.datetime.now().isoformat(timespec="seconds"), load_average_start=os.getloadavg(),
                 busy_warning=(f"load average {load:.1f} on {cpus} CPUs at the start: timings are not representative"
                               if load > 0.5 * cpus else None))
    variants = []
    for pool in POOLS:
        logging.info("nce_pool=%s ...", pool)
        variants.append(run_variant(llm, pool, batch))
    out = dict(setup=setup, variants=variants)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "nce_pool.json"), "w") as f:
        json.dump(out, f, indent=2)
    md = markdown(out)
    with open(os.path.join(_OUT.value, "nce_pool.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    app.run(main)
