"""Start-up checks of a run's config: one line naming the field, before any data is read or anything compiles.

Each check here guards a failure that otherwise surfaces late (after minutes of data preparation or XLA
compilation) or deep inside a library (a reshape error in the scanned step, an opaque sharding error).
"""
from __future__ import annotations

import math
import os

from rsllm_jax import sharding

LLM_STAGES = ("stage1", "stage2", "eval")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would."""


def _positive(cfg, dotted: str, *, integer: bool = True, allow_zero: bool = False) -> None:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
    ok = ok and (node >= 0 if allow_zero else node > 0) and (not integer or float(node).is_integer())
    if not ok:
        want = ("a non-negative" if allow_zero else "a positive") + (" integer" if integer else " finite number")
        raise ConfigError(f"config.{dotted}={node!r}: expected {want}")


def _workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory: pass a directory for the run")
    parent = workdir
    while parent and not os.path.exists(parent):  # the nearest existing ancestor must be writable
        parent = os.path.dirname(parent.rstrip(os.sep))
    parent = parent or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir}: {parent} is not a writable directory")


def check(cfg, *, num_devices: int, workdir: str | None = None) -> None:
    """Raise ConfigError on the first problem found (`num_devices`: the run's global device count)."""
    stage = cfg.stage
    if workdir is not None:
        _workdir(workdir)
    try:
        dims = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    n_batch = dims[0] * dims[1]  # the batch is split over the data and fsdp axes
    if stage == "sasrec":
        for f in ("sasrec.batch_size", "sasrec.eval_batch_size", "sasrec.epochs", "sasrec.hidden"):
            _positive(cfg, f)
        _positive(cfg, "sasrec.lr", integer=False)
    if stage in LLM_STAGES:
        for f in ("eval.batch_size", "eval.max_new_tokens", "data.num_candidates", "data.max_history", "lora.rank"):
            _positive(cfg, f)
        _positive(cfg, "eval.max_rows", allow_zero=True)
        if cfg.data.num_candidates < 2:
            raise ConfigError(f"config.data.num_candidates={cfg.data.num_candidates}: a choice needs >= 2 candidates")
    if stage in ("stage1", "stage2"):
        for f in ("train.batch_size", "train.grad_accum_steps"):
            _positive(cfg, f)
        for f in ("train.max_train_samples", "train.val_samples", "train.checkpoint_every_steps"):
            _positive(cfg, f, allow_zero=True)
        _positive(cfg, "train.num_epochs", integer=False)
        _positive(cfg, "optim.lr", integer=False)
        bs, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
        if bs % accum:
            raise ConfigError(f"config.train.batch_size={bs} is not divisible by config.train.grad_accum_steps={accum}")
        if bs % n_batch:
            raise ConfigError(f"config.train.batch_size={bs} is not divisible by the {n_batch} data-parallel devices "
                              f"(mesh data x fsdp = {dims[0]} x {dims[1]})")
    folds = cfg.prompts.get("crossfit_folds", 0)
    if stage in LLM_STAGES and folds:
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
            raise ConfigError(f"config.prompts.crossfit_folds={folds!r}: expected 0 (off) or an integer >= 2")
        if cfg.prompts.get("candidate_order", "given") != "sasrec":
            raise ConfigError("config.prompts.crossfit_folds is set but config.prompts.candidate_order="
                              f"{cfg.prompts.get('candidate_order', 'given')!r}: cross-fitting changes only the "
                              "SASRec order of the training windows; set candidate_order='sasrec'")
