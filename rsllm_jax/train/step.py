"""The one pure train step of the LLM stages: gradient accumulation inside, gradients only for the
trainable subtree, one optimizer update per call.

The loss function is passed in (stage 1 and stage 2 differ only in their batches and loss weights),
so this module knows nothing about prompts or towers. `jit_train_step` adds explicit shardings and
donation; the caller wraps it in `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

# loss_fn(trainable, frozen, micro_batch, rng) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # differentiated and updated
    frozen: Any  # read-only (base LLM, SASRec table); never gets optimizer state
    opt_state: Any

    def saveable(self) -> dict:
        """What a checkpoint needs: the frozen part is reloaded from the base weights."""
        return dict(step=self.step, trainable=self.trainable, opt_state=self.opt_state)


def create_state(trainable, frozen, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable))


def opt_state_shardings(tx: optax.GradientTransformation, trainable, mesh):
    """Optimizer-state shardings that follow the parameters they track (Adam's mu/nu are sharded like
    their parameter, counters replicated): read from the compiled `tx.init`, so any optax chain works.
    `trainable` may hold arrays or ShapeDtypeStructs carrying shardings."""
    with jax.set_mesh(mesh):
        return jax.jit(tx.init).lower(trainable).compile().output_shardings


def split_micro_batches(batch, accum_steps: int):
    """[B, ...] -> [accum_steps, B // accum_steps, ...] (the scan axis first)."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={accum_steps}")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return jax.tree.map(split, batch)


def train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, accum_steps: int,
    state: TrainState, batch, rng: jax.Array,
) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(carry, xs):
        grads_acc, metrics_acc = carry
        i, micro_batch = xs
        (_, metrics), grads = grad_fn(state.trainable, state.frozen, micro_batch, jax.random.fold_in(rng, i))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        metrics_acc = jax.tree.map(lambda a, m: a + m.astype(jnp.float32), metrics_acc, metrics)
        return (grads_acc, metrics_acc), None

    micro_batches = split_micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metrics_shape = jax.eval_shape(lambda: loss_fn(state.trainable, state.frozen, first, rng)[1])
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
    zeros_m = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape)
    (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m), (jnp.arange(accum_steps), micro_batches))
    grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grads, state.trainable)
    metrics = jax.tree.map(lambda m: m / accum_steps, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if isinstance(grads, Mapping) and len(grads) > 1:
        # Per top-level group (llm LoRA, projector, [IID] row, ...): which part a spike comes from.
        for name, g in grads.items():
            metrics[f"grad_norm/{name}"] = optax.tree.norm(g)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def jit_train_step(loss_fn: LossFn, tx, accum_steps: int, state_shardings, batch_shardings, replicated):
    """jax.jit with explicit in/out shardings; the old state's buffers are donated to the new one."""
    def step(state, batch, rng):
        return train_step(loss_fn, tx, accum_steps, state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
