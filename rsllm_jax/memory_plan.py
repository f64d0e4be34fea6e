"""Ahead-of-time memory plan: compile the stage-2 train step for a model and mesh without allocating it.

    python -m rsllm_jax.memory_plan --config=configs/llama2_7b.py --arch=llama2-7b \
        --layouts=fsdp8,data2_fsdp4,tensor2_fsdp4 --micro_batches=1,2,4 --out=docs/scaling.json

Every parameter, optimizer-state leaf and batch array is a `jax.ShapeDtypeStruct` carrying its
NamedSharding; `jit(...).lower(...).compile()` runs XLA's SPMD partitioner and buffer assignment for
the whole step (LoRA + projector gradients, NIP + both InfoNCE towers, accumulation scan, Adam) and
`memory_analysis()` reports what one device needs. Nothing is allocated, so a 7B plan fits on a laptop.
With no accelerators the program is compiled for `--devices` fake CPU devices: buffer sizes follow the
shapes and shardings, not the backend, though a TPU/GPU compiler fuses differently (temps differ by
tens of percent, arguments do not).
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # fake devices must be requested before jax initialises
    _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_n}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rsllm_jax import sharding
from rsllm_jax.models.llama import LlamaConfig
from rsllm_jax.models.lora import split_trainable
from rsllm_jax.models.rsllm import RSLLM, RSLLMConfig
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import make_optimizer
from rsllm_jax.train.rsllm_setup import MASTER_DTYPE, NUM_ADDED_TOKENS, dummy_inputs, lora_config
from rsllm_jax.train.rsllm_step import rsllm_loss

# Architectures by name (from their Hugging Face config.json), so a plan needs no weights on disk.
ARCHS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                                max_position_embeddings=8192),
    "tiny": LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16),
}

def _define_flags() -> dict:
    """CLI flags, defined only when run as a program (tests import this module next to other CLIs)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", "configs/llama2_7b.py",
                                               "Run config (loss, LoRA, optimizer, dtypes)."),
        arch=flags.DEFINE_enum("arch", "llama2-7b", list(ARCHS), "LLM architecture to plan for."),
        layouts=flags.DEFINE_list("layouts", ["fsdp8", "data2_fsdp4", "fsdp4_tensor2"],
                                  "Meshes as <axis><size>_... (axes data, fsdp, tensor; missing axes are 1)."),
        micro=flags.DEFINE_list("micro_batches", ["1", "2", "4"], "Sequences per device per micro-batch."),
        seq=flags.DEFINE_integer("seq_len", 512, "Prompt bucket length (LLaRA-style prompts fit in 512)."),
        accum=flags.DEFINE_integer("grad_accum_steps", 2, "Micro-batches accumulated inside one step."),
        devices=flags.DEFINE_integer("devices", 8, "Device count (fake CPU devices without accelerators)."),
        out=flags.DEFINE_string("out", "", "Write the plan as JSON here (and print a markdown table)."),
    )


def parse_layout(name: str) -> dict[str, int]:
    """'data2_fsdp4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}."""
    dims = dict(data=1, fsdp=1, tensor=1)
    for part in name.split("_"):
        axis = part.rstrip("0123456789")
        if axis not in dims or axis == part:
            raise ValueError(f"layout {name!r}: {part!r} is not <data|fsdp|tensor><size>")
        dims[axis] = int(part[len(axis):])
    return dims


def abstract_batch(global_batch: int, seq_len: int, target_len: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch's keys and shapes (data/prompt_pipeline.py), batch-sharded, as abstract arrays."""
    seq = ("input_ids", "attention_mask", "slot_items", "labels", "loss_mask", "history_mask", "answer_mask")
    tgt = ("target_input_ids", "target_attention_mask", "target_slot_items")
    shapes = {**{k: (global_batch, seq_len) for k in seq}, **{k: (global_batch, target_len) for k in tgt},
              "target_item": (global_batch,), "valid": (global_batch,)}
    return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding.batch_sharding(mesh, len(s)))
            for k, s in shapes.items()}


def plan_one(cfg, arch: LlamaConfig, dims: dict[str, int], micro_per_device: int, *, seq_len: int,
             accum: int, num_items: int = 1682, rec_dim: int = 64, devices=None) -> dict:
    """Compile the stage-2 step for one mesh and micro-batch; per-device bytes from the compiled program."""
    devices = list(devices if devices is not None else jax.devices())
    mesh_cfg = dataclasses.make_dataclass("M", ["data", "fsdp", "tensor"])(**dims)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    dtype, param_dtype = jnp.dtype(cfg.llm.dtype), jnp.dtype(cfg.llm.param_dtype)
    llm_cfg = dataclasses.replace(arch, scan_layers=cfg.llm.scan_layers, remat_policy=cfg.llm.remat_policy)
    model = RSLLM(RSLLMConfig(llm=llm_cfg, num_added_tokens=NUM_ADDED_TOKENS, num_items=num_items, rec_dim=rec_dim),
                  dtype=dtype, param_dtype=param_dtype, lora=lora_config(cfg))
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(num_items))["params"], jax.random.key(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
    trainable, frozen = split_trainable(params, tuple(cfg.trainable))
    # As build_rsllm places them: trained leaves are fp32 master weights whatever param_dtype is.
    trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, MASTER_DTYPE, sharding=a.sharding), trainable)
    tr_sh, fr_sh = split_trainable(shardings, tuple(cfg.trainable))
    tx = make_optimizer(cfg.optim, 1000)
    opt_sh = step_lib.opt_state_shardings(tx, trainable, mesh)
    repl = sharding.replicated(mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh, opt_state=opt_sh)
    state = jax.eval_shape(functools.partial(step_lib.create_state, tx=tx), trainable, frozen)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)

    dp = dims["data"] * dims["fsdp"]
    global_batch = micro_per_device * dp * accum
    batch = abstract_batch(global_batch, seq_len, cfg.prompts.target_len, mesh)
    batch_sh = {k: v.sharding for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    fn = step_lib.jit_train_step(functools.partial(rsllm_loss, model, cfg.loss), tx, accum, state_sh, batch_sh, repl)
    t0 = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = fn.lower(state, batch, rng).compile()
    mem = compiled.memory_analysis()
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    return dict(
        layout="_".join(f"{k}{v}" for k, v in dims.items() if v > 1) or "single", mesh=dims,
        micro_batch_per_device=micro_per_device, global_batch_per_step=global_batch, grad_accum_steps=accum,
        seq_len=seq_len, frozen_params=n_frozen, trainable_params=n_train,
        argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
        # Donated state aliases its outputs, so they are counted once.
        peak_bytes=arg + out - alias + temp, compile_s=round(time.time() - t0, 1),
        dtype=str(dtype), param_dtype=str(param_dtype), remat_policy=cfg.llm.remat_policy,
        backend=jax.devices()[0].platform,
    )


def markdown(rows: list[dict]) -> str:
    gib = 2.0 ** 30
    lines = ["| layout | micro-batch / device | global batch / step | weights+state (args) GiB | temps GiB | "
             "peak GiB / device | compile s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['micro_batch_per_device']} | {r['global_batch_per_step']} | "
                     f"{r['argument_bytes'] / gib:.2f} | {r['temp_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | "
                     f"{r['compile_s']} |")
    return "\n".join(lines)


def main(argv, f: dict) -> None:
    del argv
    cfg = f["config"].value
    arch = ARCHS[f["arch"].value]
    devices = jax.devices()[: f["devices"].value]
    logging.info("planning %s on %d %s devices", f["arch"].value, len(devices), devices[0].platform)
    rows = []
    for layout in f["layouts"].value:
        dims = parse_layout(layout)
        for m in f["micro"].value:
            row = plan_one(cfg, arch, dims, int(m), seq_len=f["seq"].value, accum=f["accum"].value, devices=devices)
            row["arch"] = f["arch"].value
            logging.info("%s micro %s: peak %.2f GiB/device (compile %.0fs)", layout, m, row["peak_bytes"] / 2**30,
                         row["compile_s"])
            rows.append(row)
    table = markdown(rows)
    print(table)
    out = f["out"].value
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(dict(arch=f["arch"].value, rows=rows, table=table), fh, indent=2)


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(functools.partial(main, f=_flags))
