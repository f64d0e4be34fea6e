"""Optimizer for the LLM stages (spec §5): Adam, linear warm-up then cosine decay, gradient-norm
clipping (global, or per top-level parameter group), weight decay only where a regex says (the
projector)."""
from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_fraction: float, min_lr_ratio: float):
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * min_lr_ratio,
    )


def schedule_for(opt_cfg, total_steps: int):
    """The run's learning-rate schedule (the optimizer's, and what the trainers log as `lr`)."""
    return learning_rate_schedule(opt_cfg.lr, total_steps, opt_cfg.warmup_fraction, opt_cfg.min_lr_ratio)


def regex_mask(params, pattern: str):
    """Bool tree: True where the '/'-joined path of a leaf fully matches `pattern`."""
    rx = re.compile(pattern) if pattern else None
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {k: bool(rx and rx.fullmatch(k)) for k in flat}, sep="/"
    )


CLIP_SCOPES = ("global", "group")


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied to each top-level group of a dict tree on its own.

    With one global norm, a spike in one group (the projector's, in stage 2) scales every other
    group's update down with it; per group, each part keeps its own step size. Stateless like the
    global clip, so the optimizer state has the same tree either way (a run may switch on resume)."""
    inner = optax.clip_by_global_norm(max_norm)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        if not isinstance(updates, dict):
            raise TypeError(f"clip_scope='group' needs a dict of parameter groups, got {type(updates).__name__}")
        return {k: inner.update(v, inner.init(v))[0] for k, v in updates.items()}, state

    return optax.GradientTransformation(init, update)


def gradient_clipping(max_norm: float, scope: str = "global") -> optax.GradientTransformation:
    if scope == "global":
        return optax.clip_by_global_norm(max_norm)
    if scope == "group":
        return clip_by_group_norm(max_norm)
    raise ValueError(f"config.optim.clip_scope must be one of {CLIP_SCOPES}, got {scope!r}")


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """opt_cfg: lr, warmup_fraction, min_lr_ratio, b1, b2, eps, weight_decay, weight_decay_regex,
    max_grad_norm, clip_scope. Updates with non-finite gradients are skipped. Applied to the trainable subtree only, so frozen weights carry no
    Adam state."""
    from rsllm_jax.train.nonfinite import skip_nonfinite

    schedule = schedule_for(opt_cfg, total_steps)
    return skip_nonfinite(optax.chain(
        gradient_clipping(opt_cfg.max_grad_norm, opt_cfg.get("clip_scope", "global")),
        optax.adamw(
            schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
            mask=lambda p: regex_mask(p, opt_cfg.weight_decay_regex),
        ),
    ))  # a step with non-finite gradients changes nothing (train/nonfinite.py)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
