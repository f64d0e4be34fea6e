"""The NaN/Inf guard every trainer uses: a non-finite step changes nothing, is logged, and N in a row stop.

The optimizer side is optax's `apply_if_finite`: an update whose gradients hold a NaN or Inf is replaced by
zeros and the optimizer state is kept, so the parameters (and the next checkpoint) stay the last good
ones. The host side (`NonFiniteGuard`) reads each step's loss and gradient norm, writes a `nonfinite` record
with the step to metrics.jsonl (the data stream is a function of the step, so that names the batch: a resumed
run replays it exactly) and stops the run after `max_in_a_row` consecutive bad steps, when lowering the
learning rate or fixing the data is the only way on.
"""
from __future__ import annotations

import math

import jax
import optax
from absl import logging

# apply_if_finite applies the update anyway after this many consecutive errors; the host guard stops long
# before, so the optimizer never does.
_NEVER = 2 ** 30


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, what: str, workdir: str, log=None, hint: str = "lower the learning rate"):
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps={max_in_a_row}: expected >= 1")
        self.max_in_a_row, self.what, self.workdir, self.log, self.hint = max_in_a_row, what, workdir, log, hint
        self.in_a_row, self.streak_start = 0, 0

    def check(self, step: int, metrics: dict) -> bool:
        """True when step `step`'s metrics (loss, grad norm, ...) are all finite. Otherwise logs the skip and,
        after max_in_a_row of them in a row, raises FloatingPointError."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if all(math.isfinite(v) for v in values.values()):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.streak_start = step
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        logging.warning("%s: step %d is non-finite (%s): update skipped, parameters unchanged (%d in a row)",
                        self.what, step, bad, self.in_a_row)
        if self.log is not None:
            self.log.write(dict(step=step, nonfinite=1, **{k: str(v) for k, v in bad.items()}))
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.what}: {self.in_a_row} non-finite steps in a row (steps {self.streak_start}-{step}, "
                f"{sorted(bad)}); no update was applied from them, and the last checkpoint in "
                f"{self.workdir}/checkpoints holds the last good parameters: {self.hint} and resume")
        return False
