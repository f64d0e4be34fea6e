"""Where a run finds the runs it depends on (stage 0 for stage 2, reconstruction for P2Rec, ...)."""
from __future__ import annotations

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util


def sibling_dir(configured: str, workdir: str, name: str) -> str:
    """A configured run directory, or <workdir>/../<name> (where main.py's default workdirs put it)."""
    return configured or os.path.join(os.path.dirname(os.path.abspath(workdir)), name)


def has_checkpoint(run_dir: str) -> bool:
    """Whether a run directory holds an orbax checkpoint (best/ or checkpoints/ non-empty)."""
    return any(os.path.isdir(os.path.join(run_dir, d)) and os.listdir(os.path.join(run_dir, d))
               for d in ("best", "checkpoints"))


def restore_subtree(run_dir: str, key: str) -> tuple[dict, int]:
    """`state[key]` of a run's best (else latest) orbax checkpoint as host numpy arrays, and its step.
    Restored onto one local device whatever topology saved it (a pod slice, two processes): the saved
    shardings name devices this process may not have."""
    for sub in ("best", "checkpoints"):
        path = os.path.abspath(os.path.join(run_dir, sub))  # orbax refuses relative paths
        if not os.path.isdir(path):
            continue
        mgr = ocp.CheckpointManager(path, item_names=("state", "iter", "meta"))
        step = mgr.latest_step()
        if step is None:
            mgr.close()
            continue
        meta = ocp.StandardCheckpointer().metadata(os.path.join(path, str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                              getattr(meta, "tree", meta))
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        mgr.close()
        if key not in restored["state"]:
            raise KeyError(f"checkpoint {path}/{step} has no {key!r} (keys: {sorted(restored['state'])})")
        logging.info("restored %s from %s step %d", key, path, step)
        return jax.tree.map(np.asarray, restored["state"][key]), int(step)
    raise FileNotFoundError(f"no orbax checkpoint under {run_dir}/best or {run_dir}/checkpoints")


def restore_trainable(run_dir: str, keep: str | None = None) -> dict:
    """The trainable subtree of an LLM run's best (else latest) checkpoint; `keep`: a regex on the
    '/'-joined leaf paths (e.g. only the LoRA factors of a stage-1 run)."""
    tree, _ = restore_subtree(run_dir, "trainable")
    flat = traverse_util.flatten_dict(tree, sep="/")
    if keep:
        flat = {k: v for k, v in flat.items() if re.fullmatch(keep, k)}
    return traverse_util.unflatten_dict(flat, sep="/")
