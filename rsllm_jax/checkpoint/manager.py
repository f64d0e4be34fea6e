"""Orbax checkpoints of a run: train state + Grain iterator position + small JSON metadata.

Two managers per run directory:
  <workdir>/checkpoints/  the latest `keep` steps, for resuming a killed run;
  <workdir>/best/         the best step by a validation metric (the loop decides), for evaluation and export.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (`cleanup_tmp_directories` removes the debris).
Orbax deletes an old step file by file, so a run killed mid-delete leaves a step directory without its
commit marker; `_remove_half_deleted_steps` clears those on open, before any restore can list them.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging


COMMIT_MARKER = "commit_success.txt"  # orbax writes it into the temporary directory before the rename


def _remove_half_deleted_steps(directory: str) -> list[str]:
    """Step directories older than the newest committed one that lack the commit marker: what a kill
    during orbax's deletion of an old step leaves. The newest step is never touched."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        return []
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    committed = [p for p in steps if (p / COMMIT_MARKER).exists()]
    if not committed:
        return []
    newest = int(committed[-1].name)
    removed = []
    for p in steps:
        if int(p.name) < newest and not (p / COMMIT_MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)  # another process of the same run may be removing it too
            removed.append(str(p))
    if removed:
        logging.warning("removed half-deleted checkpoint steps left by a killed run: %s", removed)
    return removed


class RunCheckpoints:
    def __init__(self, workdir: str, *, keep: int = 2, with_best: bool = True):
        self.workdir = os.path.abspath(workdir)
        self._saved = {"latest": set(), "best": set()}  # steps saved by this process (orbax lists them once committed)
        for sub in ("checkpoints", "best"):
            _remove_half_deleted_steps(os.path.join(self.workdir, sub))
        self.latest = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            item_names=("state", "iter", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
        )
        self.best = None
        if with_best:
            self.best = ocp.CheckpointManager(
                os.path.join(self.workdir, "best"),
                item_names=("state", "meta"),
                options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True),
            )

    # ---- saving ----
    def save(self, step: int, state: Any, data_iter=None, meta: dict | None = None) -> None:
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
        if data_iter is not None:
            items["iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if step in self._saved["latest"] or step in self.latest.all_steps():
            return  # already saved here, or a resumed run re-reached a step it had committed: the same state
        self._saved["latest"].add(step)
        self.latest.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, state: Any, metrics: dict, meta: dict | None = None) -> None:
        """Replace the kept best checkpoint. The loop decides what "better" means and keeps the best
        value in the resumable `meta`, so a resumed run does not overwrite a better earlier step."""
        meta = dict(meta or {}, metrics=metrics)
        if step in self._saved["best"] or step in self.best.all_steps():
            # Killed after the best save and before the resumable one: the resumed run re-reaches this
            # step with the same state, and orbax refuses to overwrite a step.
            logging.info("best checkpoint for step %d already committed; kept", step)
            return
        self._saved["best"].add(step)
        self.best.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    # ---- restoring ----
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, abstract_state: Any, data_iter=None) -> tuple[int, Any, dict]:
        step = self.latest.latest_step()
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iter is not None:
            items["iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        return step, restored["state"], dict(restored["meta"] or {})

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.latest_step()

    def restore_best(self, abstract_state: Any) -> tuple[int, Any, dict]:
        step = self.best.latest_step()
        restored = self.best.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return step, restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()
        logging.info("checkpoints flushed under %s", self.workdir)

    def close(self) -> None:
        self.latest.close()
        if self.best is not None:
            self.best.close()

