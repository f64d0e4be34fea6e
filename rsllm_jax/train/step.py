"""The one pure train step of the LLM stages: gradient accumulation inside, gradients only for the
trainable subtree, one optimizer update per call.

The loss function is passed in (stage 1 and stage 2 differ only in their batches and loss weights),
so this module knows nothing about prompts or towers. `jit_train_step` adds explicit shardings and
donation; the caller wraps it in `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.

A plain `loss_fn` sees one micro-batch at a time, so an in-batch contrastive loss inside it only ever
sees the rows of one micro-batch as negatives. A `PooledLoss` instead pools its contrastive part over
every micro-batch of the step (GradCache, Gao et al. 2021, arXiv 2101.06983): a forward-only pass
collects each micro-batch's representations, the pooled loss and its gradient with respect to those
representations are computed once over the whole step, and a second pass back-propagates each
micro-batch's share through its own graph. The gradient equals that of one un-accumulated batch at
the memory of one micro-batch, for the price of one extra forward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

# loss_fn(trainable, frozen, micro_batch, rng) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class PooledLoss:
    """A loss whose contrastive part is pooled over the whole step rather than one micro-batch.

    local(trainable, frozen, micro_batch, rng) -> (local loss, reps, metrics): the per-micro-batch part
        (averaged over micro-batches like a plain loss_fn) and the representations [b, ...] (a pytree)
        the pooled part reads.
    pooled(reps, batch) -> (pooled loss, metrics): over the representations of every micro-batch of the
        step concatenated [B, ...], with the step's batch [B, ...] for whatever else it needs (ids, masks).
    The step's loss is mean(local) + pooled; metrics["loss"] reports it.
    """
    local: Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, Any, dict]]
    pooled: Callable[[Any, Any], tuple[jax.Array, dict]]


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


def _as_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _accumulate(per_micro, trainable, micro_batches, accum_steps: int):
    """Scan `per_micro(i, micro_batch) -> (grads, metrics)` over the micro-batches; sums in fp32."""
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metrics_shape = jax.eval_shape(lambda: per_micro(0, first)[1])
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    zeros_m = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape)

    def micro(carry, xs):
        grads_acc, metrics_acc = carry
        grads, metrics = per_micro(*xs)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        metrics_acc = jax.tree.map(lambda a, m: a + m.astype(jnp.float32), metrics_acc, metrics)
        return (grads_acc, metrics_acc), None

    (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m), (jnp.arange(accum_steps), micro_batches))
    return grads, jax.tree.map(lambda m: m / accum_steps, metrics)


def _micro_grads(loss_fn: LossFn, state: TrainState, micro_batches, rng, accum_steps: int):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def per_micro(i, micro_batch):
        (_, metrics), grads = grad_fn(state.trainable, state.frozen, micro_batch, jax.random.fold_in(rng, i))
        return grads, metrics

    return _accumulate(per_micro, state.trainable, micro_batches, accum_steps)


def _pooled_grads(loss: PooledLoss, state: TrainState, micro_batches, rng, accum_steps: int):
    """GradCache: the gradient of mean_i local_i + pooled(reps_1..k) without holding k graphs at once."""
    k = accum_steps

    # Pass 1, forward only: every micro-batch's representations (same rng per micro-batch as pass 2,
    # so dropout masks, and therefore the representations, are the ones pass 2 differentiates).
    def reps_of(xs):
        i, micro_batch = xs
        return loss.local(state.trainable, state.frozen, micro_batch, jax.random.fold_in(rng, i))[1]

    reps = jax.lax.stop_gradient(jax.lax.map(reps_of, (jnp.arange(k), micro_batches)))
    flat = lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)  # noqa: E731
    (pooled, pooled_metrics), d_reps = jax.value_and_grad(
        lambda r: loss.pooled(flat(r), flat(micro_batches)), has_aux=True)(reps)

    # Pass 2: micro-batch i's share of the pooled gradient is <d pooled / d reps_i, d reps_i / d theta>;
    # times k because the accumulated gradient is divided by k like every micro-batch term.
    def per_micro(i, micro_batch):
        d_i = jax.tree.map(lambda d: d[i], d_reps)

        def surrogate(trainable):
            local, reps_i, metrics = loss.local(trainable, state.frozen, micro_batch, jax.random.fold_in(rng, i))
            dot = sum(jnp.vdot(d.astype(jnp.float32), r.astype(jnp.float32))
                      for d, r in zip(jax.tree.leaves(d_i), jax.tree.leaves(reps_i)))
            return local + k * dot, (local, metrics)

        (_, (local, metrics)), grads = jax.value_and_grad(surrogate, has_aux=True)(state.trainable)
        return grads, _as_f32(dict(metrics, loss=local))

    grads, metrics = _accumulate(per_micro, state.trainable, micro_batches, k)
    metrics.update(_as_f32(pooled_metrics))
    metrics["loss"] = metrics["loss"] + pooled.astype(jnp.float32)
    return grads, metrics


def train_step(
    loss_fn: LossFn | PooledLoss, tx: optax.GradientTransformation, accum_steps: int,
    state: TrainState, batch, rng: jax.Array,
) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(rng, state.step)
    micro_batches = split_micro_batches(batch, accum_steps)
    if isinstance(loss_fn, PooledLoss):
        grads, metrics = _pooled_grads(loss_fn, state, micro_batches, rng, accum_steps)
    else:
        grads, metrics = _micro_grads(loss_fn, state, micro_batches, rng, accum_steps)
    grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grads, state.trainable)

    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    if isinstance(grads, Mapping) and len(grads) > 1:
        # Per top-level group (llm LoRA, projector, [IID] row, ...): which part a spike comes from.
        # The global norm is their root sum of squares: every gradient is reduced once.
        groups = {name: optax.tree.norm(g) for name, g in grads.items()}
        metrics.update({f"grad_norm/{name}": n for name, n in groups.items()})
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.square(n) for n in groups.values()))
    else:
        metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics


def jit_train_step(loss_fn: LossFn | PooledLoss, tx, accum_steps: int, state_shardings, batch_shardings, replicated):
    """jax.jit with explicit in/out shardings; the old state's buffers are donated to the new one."""
    def step(state, batch, rng):
        return train_step(loss_fn, tx, accum_steps, state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
