"""The runs a stage reads, and training the missing ones before the stage starts.

Stage 2 reads stage 0's item table (and its user states, when the recipe orders candidates by SASRec
or reads the user slot) and stage 1's LoRA; P2Rec reconstruction reads stage 0; P2Rec augmentation
reads the reconstruction. `build_missing` is called by the orchestration layer (`main`, and through
it the experiments driver) before the stage: with config.stage2.build_missing /
config.p2rec.build_missing a missing run is trained first, into the directory the stage will read.
The trainers only read what is there and say what is missing.
"""
from __future__ import annotations

import copy
import os

from absl import logging

from rsllm_jax.checkpoint.run_dirs import has_checkpoint, sibling_dir


def stage2_dirs(cfg, workdir: str) -> tuple[str, str | None]:
    """(stage-0 dir, stage-1 dir or None for 'none') that a stage-2 run in `workdir` reads."""
    s2 = cfg.stage2
    sasrec_dir = sibling_dir(s2.sasrec_dir, workdir, f"sasrec-{cfg.data.dataset}")
    stage1_dir = None if s2.stage1_dir == "none" else sibling_dir(s2.stage1_dir, workdir, "stage1")
    return sasrec_dir, stage1_dir


def stage0_ready(sasrec_dir: str, with_user_states: bool) -> bool:
    from rsllm_jax.checkpoint import user_states

    return os.path.exists(os.path.join(sasrec_dir, "item_embeddings.npy")) and (
        not with_user_states or os.path.exists(os.path.join(sasrec_dir, user_states.FILENAME)))


def build_missing(cfg, workdir: str, *, llm=None) -> None:
    """Train the runs `cfg.stage` reads that are missing (when its config allows it); else do nothing."""
    if cfg.stage == "stage2" and cfg.stage2.build_missing:
        _stage2(cfg, workdir)
    elif cfg.stage in ("p2rec_reconstruct", "p2rec_augment") and cfg.p2rec.build_missing:
        _p2rec(cfg, workdir, llm=llm)


def _stage0(cfg, sasrec_dir: str, why: str) -> None:
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    # A finished stage-0 run only re-evaluates and re-exports (the user states of older runs).
    logging.info("%s: no SASRec outputs in %s; running stage 0 first", why, sasrec_dir)
    train_sasrec(cfg, sasrec_dir)


def _stage2(cfg, workdir: str) -> None:
    from rsllm_jax.train.rsllm_trainer import needs_user_states, run_stage

    sasrec_dir, stage1_dir = stage2_dirs(cfg, workdir)
    if not stage0_ready(sasrec_dir, needs_user_states(cfg)):
        _stage0(cfg, sasrec_dir, "stage 2")
    if stage1_dir is not None and not has_checkpoint(stage1_dir):
        logging.info("stage 2: no stage-1 checkpoint in %s; running stage 1 first", stage1_dir)
        c1 = copy.deepcopy(cfg)
        with c1.unlocked():
            c1.stage = "stage1"
            c1.prompts.use_ids = False
            c1.prompts.candidate_order = "given"
            c1.train.max_train_samples = cfg.stage2.stage1_train_samples
        run_stage(c1, stage1_dir)


def _p2rec(cfg, workdir: str, *, llm=None) -> None:
    from rsllm_jax.p2rec.augment import NO_RECONSTRUCTION

    p = cfg.p2rec
    if cfg.stage == "p2rec_reconstruct":
        sasrec_dir = sibling_dir(p.sasrec_dir, workdir, f"sasrec-{cfg.data.dataset}")
        if not has_checkpoint(sasrec_dir):
            _stage0(cfg, sasrec_dir, "p2rec")
        return
    if p.reconstruct_dir == NO_RECONSTRUCTION:
        return
    rdir = sibling_dir(p.reconstruct_dir, workdir, f"p2rec_reconstruct-{cfg.data.dataset}")
    if not has_checkpoint(rdir):
        from rsllm_jax.p2rec.reconstruct import run_reconstruct

        logging.info("p2rec augment: no reconstruction checkpoint in %s; running it first", rdir)
        c = copy.deepcopy(cfg)
        with c.unlocked():
            c.stage = "p2rec_reconstruct"
        build_missing(c, rdir, llm=llm)  # the reconstruction's own stage 0
        run_reconstruct(c, rdir, llm=llm)
