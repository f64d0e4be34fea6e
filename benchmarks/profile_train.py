"""Where the JAX stage-2 train step spends its time on this CPU: a jax.profiler trace of a few steps,
aggregated by XLA operation (the evidence behind the benchmark's notes).

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python -m benchmarks.profile_train --out=results/bench/profile
Prints the top operations by total time and writes DIR/top_ops.json (the raw trace stays in DIR).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from absl import app, flags

from benchmarks import llm_setup, workload
from benchmarks.trace_stats import categories, top_ops
from rsllm_jax import sharding
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import make_optimizer
from rsllm_jax.train.rsllm_step import rsllm_loss

_OUT = flags.DEFINE_string("out", "results/bench/profile", "Trace directory")
_STEPS = flags.DEFINE_integer("steps", 2, "Profiled steps (after one compiling step)")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute (and frozen-weight) dtype")


def main(argv) -> None:
    del argv
    llm = llm_setup.load("smollm2", True)
    setup = llm_setup.build(llm, scan_layers=True, target_len=24, dtype=_DTYPE.value, with_torch=False)
    cfg, built = setup.cfg, setup.built
    batch = workload.train_batch(batch=_BATCH.value, seq_len=_SEQ.value, target_len=24,
                                 vocab=built.model.config.llm.vocab_size)
    (tr, fr), (tr_sh, fr_sh) = built.split()
    tx = make_optimizer(cfg.optim, 1000)
    state = step_lib.create_state(tr, fr, tx)
    repl = sharding.replicated(setup.mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh,
                                   opt_state=jax.tree.map(lambda _: repl, state.opt_state))
    batch_sh = {k: sharding.batch_sharding(setup.mesh, np.ndim(v)) for k, v in batch.items()}
    fn = step_lib.jit_train_step(functools.partial(rsllm_loss, built.model, cfg.loss), tx,
                                 cfg.train.grad_accum_steps, state_sh, batch_sh, repl)
    with setup.context():
        state = jax.device_put(state, state_sh)
        state, m = fn(state, batch, jax.random.key(0))
        jax.block_until_ready(m)
        jax.profiler.start_trace(_OUT.value)
        for _ in range(_STEPS.value):
            state, m = fn(state, batch, jax.random.key(0))
            jax.block_until_ready(m)
        jax.profiler.stop_trace()
    rows = top_ops(_OUT.value)
    for name, ms, c in rows:
        print(f"{ms:10.1f} ms  x{c:<5d} {name[:110]}")
    cats = categories(_OUT.value, _STEPS.value)
    total = sum(cats.values())
    print("per step, by kind (op time summed over threads):")
    for k, v in cats.items():
        print(f"  {k:40s} {v:9.1f} ms  {v / total:6.1%}")
    with open(os.path.join(_OUT.value, "top_ops.json"), "w") as f:
        json.dump(dict(steps=_STEPS.value, rows=rows, per_step_ms_by_kind=cats), f, indent=1)


if __name__ == "__main__":
    app.run(main)
