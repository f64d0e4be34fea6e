"""SIGTERM is a preemption notice (Kubernetes, SLURM, Cloud TPU maintenance): finish the step, save, exit 0.

The handler only sets a flag; the training loop polls it once per step, after the update, so the
checkpoint it then writes is a consistent state. In a multi-process run the processes agree (the
largest flag wins), so every host saves the same step even if only one received the signal.
"""
from __future__ import annotations

import logging
import signal
import threading

from rsllm_jax import sharding


class Preempted(Exception):
    """Raised by a trainer after it saved the step a SIGTERM interrupted; main exits 0 on it. An
    exception, not a return value, so no caller goes on to the next stage with this one unfinished."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage}: preempted (SIGTERM) after step {step}, saved; the same command resumes it")
        self.stage, self.step = stage, step


class Preemption:
    """Context manager: while inside, SIGTERM requests a clean stop instead of killing the process."""

    def __init__(self):
        self._requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self._requested = True
        logging.warning("SIGTERM received: saving at the end of this step, then exiting")

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def requested(self) -> bool:
        """True on every process once any process was signalled (call it on every process, every step)."""
        return bool(sharding.max_across_processes(int(self._requested)))
