"""Where a run finds the runs it depends on (stage 0 for stage 2, reconstruction for P2Rec, ...)."""
from __future__ import annotations

import os


def sibling_dir(configured: str, workdir: str, name: str) -> str:
    """A configured run directory, or <workdir>/../<name> (where main.py's default workdirs put it)."""
    return configured or os.path.join(os.path.dirname(os.path.abspath(workdir)), name)


def has_checkpoint(run_dir: str) -> bool:
    """Whether a run directory holds an orbax checkpoint (best/ or checkpoints/ non-empty)."""
    return any(os.path.isdir(os.path.join(run_dir, d)) and os.listdir(os.path.join(run_dir, d))
               for d in ("best", "checkpoints"))
