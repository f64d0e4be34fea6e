"""The one training loop every stage runs: resume, step, NaN/Inf guard, log, validate, save, restore the best.

A stage (SASRec, the LLM stages 1/2, P2Rec's reconstruction) supplies a `Stage`: its initial state,
its jitted step, its batches (a Grain iterator, whose position is checkpointed), how it validates and
what "better" means. The loop owns everything around it, identically for all of them:

  resume     the run's own latest checkpoint (state, iterator position, loop bookkeeping), else
             `resume_from` (another run's latest checkpoint: fork a run into a new directory),
             else the stage's initial state (which already holds whatever it was initialised from);
  guard      a non-finite step changes nothing (optax side) and is logged; N in a row stop the run;
  log        window means of the step metrics since the last log line, the rate and ETA on the bar;
             the window travels in the checkpoint, so a resumed run logs what an unbroken one does;
  validate   when the stage says; the best score is saved to best/; `patience` evaluations without a
             gain stop the run (and a restarted early-stopped run trains no further);
  save       on improvement, periodically (the stage's cadence), on preemption and at the end; the
             training time accumulates across restarts in the checkpoint;
  preempt    SIGTERM, or `stop_after_steps` (a simulated one): save, then stop (Preempted / return);
  finish     restore the best checkpoint (if the stage validated) into the state.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from absl import logging

from rsllm_jax.checkpoint.manager import RunCheckpoints
from rsllm_jax.train.nonfinite import NonFiniteGuard
from rsllm_jax.train.preemption import Preempted, Preemption
from rsllm_jax.train.run_log import MetricsLog, Progress
from rsllm_jax.train.step import TrainState


@dataclasses.dataclass
class Validation:
    """When and how a stage validates, and what "better" means."""
    due: Callable[[int], bool]  # steps done -> validate now?
    run: Callable[[Any], dict]  # state -> metrics (floats)
    score: Callable[[dict], float]  # higher is better
    describe: Callable[[int, dict], str]  # the progress line for a validation
    tag: Callable[[int], dict] = lambda done: {}  # extra fields of the val log row and the best meta (epoch)
    patience: int = 0  # evaluations without a gain that stop the run; 0 = never stop early


@dataclasses.dataclass
class Stage:
    name: str  # in logs, errors and Preempted
    total_steps: int
    state: Any  # the initial state (sharded); its saveable form holds "step"
    batches: Iterator  # host batches; a Grain iterator whose position is checkpointed
    step: Callable[[Any, Any], tuple[Any, dict, int]]  # (state, host batch) -> (state, scalar metrics, items)
    saveable: Callable[[Any], Any]  # state -> the tree a checkpoint holds
    load: Callable[[Any, Any], Any]  # (state, restored tree) -> state (placed on the mesh)
    checkpoint_due: Callable[[int], bool]  # periodic saves
    validation: Validation | None = None
    guard_keys: tuple[str, ...] | None = None  # metrics the NaN/Inf guard reads (None: all)
    shown: tuple[str, ...] | None = None  # metrics on the progress bar (None: all)
    item_name: str = "samples"  # what `items` counts: the logged rate is <item_name>_per_s
    log_extra: Callable[[int], dict] = lambda done: {}  # more fields of a train log row (lr, epoch)
    meta: dict = dataclasses.field(default_factory=dict)  # saved with every checkpoint (the config)
    stop_after_steps: int = 0  # >0: save and return after this step (a simulated preemption)
    max_nonfinite_steps: int = 5
    hint: str = "lower the learning rate"  # what the NaN/Inf guard's error advises
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    resume_from: str = ""  # another run directory whose latest checkpoint starts this one
    desc: str = ""  # the progress bar's label (default: name)


@dataclasses.dataclass
class Outcome:
    state: Any  # the best validated state (else the last one)
    best_step: int
    best_meta: dict  # the best checkpoint's meta (its step, tag and metrics); {} without validation
    train_time_s: float  # training (incl. validation) time over every restart of the run
    interrupted_at: int | None = None  # set when stop_after_steps stopped the run


class _Window:
    """Sums of the finite steps' metrics since the last log line (JSON-able, for the checkpoint)."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.sums: dict[str, float] = dict(saved.get("sums", {}))
        self.n, self.items = int(saved.get("n", 0)), 0  # the rate restarts with the process

    def add(self, metrics: dict, items: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n, self.items = self.n + 1, self.items + items

    def means(self) -> dict:
        return {k: v / self.n for k, v in self.sums.items()}

    def dump(self) -> dict:
        return dict(sums=self.sums, n=self.n)


def load_train_state(state_sh: TrainState, state: TrainState, saved: dict) -> TrainState:
    """A restored checkpoint (step, trainable, optimizer state) back into the state, on the mesh."""
    return state.replace(**jax.device_put(saved, dict(step=state_sh.step, trainable=state_sh.trainable,
                                                      opt_state=state_sh.opt_state)))


def llm_stage_settings(cfg, lr_schedule) -> dict:
    """The `Stage` fields the LLM-trained stages (stage 1/2, P2Rec's reconstruction) read from the config."""
    return dict(checkpoint_due=lambda done: done % cfg.train.checkpoint_every_steps == 0,
                log_extra=lambda done: {"lr": float(lr_schedule(done - 1))},
                meta=dict(config=json.loads(cfg.to_json_best_effort())), stop_after_steps=cfg.train.stop_after_steps,
                max_nonfinite_steps=cfg.get("max_nonfinite_steps", 5), hint="lower config.optim.lr",
                keep_checkpoints=cfg.train.keep_checkpoints, log_every_steps=cfg.log_every_steps,
                resume_from=cfg.train.get("resume_from", ""))


def _step_of(tree) -> int:
    return int(jax.device_get(tree["step"]))


def restore_latest(ckpts: RunCheckpoints, stage: Stage, state, where: str):
    abstract = jax.eval_shape(lambda: stage.saveable(state))
    step, saved, meta = ckpts.restore_latest(abstract, stage.batches)
    logging.info("%s: resumed from step %d in %s", stage.name, step, where)
    return stage.load(state, saved), meta


def run(stage: Stage, workdir: str) -> Outcome:
    ckpts = RunCheckpoints(workdir, keep=stage.keep_checkpoints)
    state = stage.state
    fresh = dict(best_score=None, bad_evals=0, train_time_s=0.0, **stage.meta)
    meta = fresh
    if ckpts.latest_step() is not None:
        state, restored = restore_latest(ckpts, stage, state, workdir)
        meta = {**fresh, **restored}  # a checkpoint written before a bookkeeping field existed lacks it
    elif stage.resume_from:
        source = RunCheckpoints(stage.resume_from, keep=stage.keep_checkpoints, with_best=False)
        if source.latest_step() is None:
            raise FileNotFoundError(f"resume_from={stage.resume_from!r}: no checkpoint under "
                                    f"{stage.resume_from}/checkpoints to start {stage.name} from")
        state, restored = restore_latest(source, stage, state, stage.resume_from)
        source.close()
        meta = {**fresh, **restored, "best_score": None, "bad_evals": 0}  # the source's best is not in our best/
    window = _Window(meta.pop("log_window", None))
    start = _step_of(stage.saveable(state))
    val = stage.validation
    patience = val.patience if val is not None else 0
    # A run that already stopped early is finished: restarting it only restores its best.
    end = start if patience and meta["bad_evals"] >= patience else stage.total_steps

    log = MetricsLog(workdir, resume_step=start)
    guard = NonFiniteGuard(stage.max_nonfinite_steps, stage.name, workdir, log, hint=stage.hint)
    progress = Progress(stage.total_steps, start, desc=stage.desc or stage.name)
    t_mark = time.time()

    def save(done: int) -> None:
        nonlocal t_mark
        now = time.time()
        meta["train_time_s"] += now - t_mark
        t_mark = now
        ckpts.save(done, stage.saveable(state), stage.batches, meta=dict(meta, log_window=window.dump()))

    with Preemption() as sigterm:
        for step in range(start, end):
            state, metrics, items = stage.step(state, next(stage.batches))
            done = step + 1
            metrics = jax.device_get(metrics)  # one transfer per step: the guard and the log read it
            checked = metrics if stage.guard_keys is None else {k: metrics[k] for k in stage.guard_keys}
            if guard.check(done, checked):
                window.add(metrics, items)
            logged = done % stage.log_every_steps == 0 or done == stage.total_steps or done == 1
            if logged and window.n:
                means = window.means()
                shown = means if stage.shown is None else {k: means[k] for k in stage.shown if k in means}
                rate = progress.update(done - progress.bar.n, window.items, shown, item_name=stage.item_name)
                log.write({"step": done, **stage.log_extra(done), **means, f"{stage.item_name}_per_s": rate})
                window = _Window()

            improved = stop = False
            if val is not None and val.due(done):
                metrics_val = val.run(state)
                log.write({"step": done, **val.tag(done), **{f"val/{k}": v for k, v in metrics_val.items()}})
                progress.write(val.describe(done, metrics_val))
                score = val.score(metrics_val)
                if meta["best_score"] is None or score > meta["best_score"]:
                    meta.update(best_score=score, bad_evals=0)
                    improved = True
                    ckpts.save_best(done, stage.saveable(state), metrics_val, meta=dict(step=done, **val.tag(done)))
                else:
                    meta["bad_evals"] += 1
                    stop = bool(patience) and meta["bad_evals"] >= patience

            # After the validation, so a run preempted at a validation step has kept that step's best.
            # `requested` is one cross-process agreement: every process calls it at the same steps.
            going_on = done < end and not stop
            preempted = going_on and sigterm.requested()
            halted = going_on and bool(stage.stop_after_steps) and done >= stage.stop_after_steps
            if improved or stop or preempted or halted or stage.checkpoint_due(done) or done == stage.total_steps:
                save(done)
            if preempted or halted:
                progress.close()
                ckpts.wait()
                ckpts.close()
                if preempted:
                    raise Preempted(stage.name, done)
                logging.info("%s: stopped after step %d (stop_after_steps)", stage.name, done)
                return Outcome(state, done, {}, meta["train_time_s"], interrupted_at=done)
            if stop:
                progress.write(f"{stage.name}: early stop after step {done}: no validation gain in "
                               f"{patience} evaluations")
                break
    progress.close()
    ckpts.wait()

    best_step, best_meta = _step_of(stage.saveable(state)), {}
    if ckpts.best_step() is not None:
        best_step, saved, best_meta = ckpts.restore_best(jax.eval_shape(lambda: stage.saveable(state)))
        state = stage.load(state, saved)
    ckpts.close()
    return Outcome(state, best_step, best_meta, meta["train_time_s"])
