"""Which rows an InfoNCE term sees as its negatives (config.loss.nce_pool); jax-free so the results
tables (results_doc) read a run's pool from its config.json with the same rule the trainer uses.

  micro_batch: the rows of one micro-batch (what runs before the option existed did);
  step:        every row of the step's batch, across its gradient-accumulation micro-batches.
"""
from __future__ import annotations

NCE_POOLS = ("micro_batch", "step")


def nce_pool_name(loss_cfg) -> str:
    """The configured pool; configs written before the option existed mean "micro_batch"."""
    get = loss_cfg.get if isinstance(loss_cfg, dict) else (lambda k, d: getattr(loss_cfg, k, d))
    pool = get("nce_pool", "micro_batch") or "micro_batch"
    if pool not in NCE_POOLS:
        raise ValueError(f"config.loss.nce_pool={pool!r}: expected one of {', '.join(NCE_POOLS)}")
    return pool


def nce_pool_size(loss_cfg, batch_size: int, grad_accum_steps: int) -> int:
    """How many rows each InfoNCE term sees (itself + negatives): chance is ln of this."""
    return batch_size if nce_pool_name(loss_cfg) == "step" else batch_size // grad_accum_steps
