"""Entry point: python -m rsllm_jax.main --config=configs/<stage>.py --workdir=DIR [--config.a.b=value]

`config.stage` picks what runs. Overrides of fields that do not exist fail (lock_config=True).
"""
from __future__ import annotations

import json
import logging as py_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, exports. Default: runs/<stage>-<dataset>.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Initialise jax.distributed (multi-process). Default: on when the environment says this is one process "
    "of several (SLURM_NTASKS>1, a multi-host TPU slice, JAX_COORDINATOR_ADDRESS) or --coordinator_address is set.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-process runs)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (manual multi-process runs)")

STAGES = ("sasrec", "stage1", "stage2", "eval", "p2rec_reconstruct", "p2rec_augment")


class _OwnInfoOnly(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "rsllm_jax" in record.pathname


def multi_process_environment(env=os.environ) -> bool:
    """Whether the launcher started this as one process of several (so jax.distributed must run)."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    # Cloud TPU VMs list every worker of the slice; a single-host slice lists one.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
    """Start JAX's distributed runtime before any device is touched, only when multi-process."""
    import jax

    manual = _COORDINATOR.value is not None
    wanted = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else (manual or multi_process_environment())
    if not wanted:
        return
    # Auto-detection (TPU pods, SLURM, ...) when no coordinator is given; explicit values otherwise.
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def _log_runtime() -> None:
    import jax

    logging.info(
        "jax %s: process %d/%d, %d local / %d global devices (%s): %s",
        jax.__version__, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform, [str(d) for d in jax.local_devices()],
    )


def default_workdir(cfg) -> str:
    """runs/sasrec-<dataset>, runs/stage1, runs/stage2-<dataset>, runs/eval-<dataset>: stage 2 finds
    stages 0 and 1 here by default."""
    if cfg.stage == "stage1":
        return os.path.join("runs", "stage1")
    return os.path.join("runs", f"{cfg.stage}-{cfg.data.dataset}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config=configs/sasrec.py")
    initialize_distributed()
    import jax

    workdir = _WORKDIR.value or default_workdir(cfg)
    if "://" in workdir:
        raise app.UsageError(
            f"--workdir={workdir}: run directories are written with plain file I/O (metrics appended line by "
            "line, numpy exports, absl logs); mount the bucket (gcsfuse, as launch/tpu_pod.sh does) or use a "
            "shared filesystem and pass that path")
    from rsllm_jax.config_check import ConfigError, check

    try:
        check(cfg, num_devices=jax.device_count(), workdir=workdir)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    os.makedirs(workdir, exist_ok=True)
    # One log file per process (absl names it after the host and pid); only process 0 writes the rest.
    logging.get_absl_handler().use_absl_log_file("log", workdir)
    logging.set_stderrthreshold("info")
    # Libraries (orbax, grain) log every save/restore at INFO: keep their warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    _log_runtime()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))

    from rsllm_jax.train.preemption import Preempted

    from rsllm_jax.stages import build_missing

    try:
        build_missing(cfg, workdir)  # the runs this stage reads, trained first when missing and allowed
        _dispatch(cfg, workdir)
    except Preempted as e:  # saved; a scheduler's SIGTERM is not a failure
        logging.warning("%s", e)
        print(json.dumps({"preempted": e.stage, "saved_step": e.step}))


def _dispatch(cfg, workdir: str) -> None:
    if cfg.stage == "sasrec":
        from rsllm_jax.train.sasrec_trainer import train_sasrec

        results = train_sasrec(cfg, workdir)
        print(json.dumps({k: results[k] for k in ("eval_rows", "val", "test", "wall_time_s")}, indent=2))
    elif cfg.stage in ("stage1", "stage2"):
        from rsllm_jax.train.rsllm_trainer import run_stage

        results = run_stage(cfg, workdir)
        print(json.dumps({k: results[k] for k in ("eval_rows", "val", "test", "wall_time_s", "train_samples",
                                                  "interrupted_at")
                          if k in results}, indent=2))
    elif cfg.stage == "eval":
        from rsllm_jax.train.rsllm_trainer import run_eval

        print(json.dumps(run_eval(cfg, workdir), indent=2))
    elif cfg.stage == "p2rec_reconstruct":
        from rsllm_jax.p2rec.reconstruct import run_reconstruct

        results = run_reconstruct(cfg, workdir)
        print(json.dumps({k: results[k] for k in ("val", "val_baselines", "best_step", "wall_time_s", "interrupted_at")
                          if k in results}, indent=2))
    elif cfg.stage == "p2rec_augment":
        from rsllm_jax.p2rec.augment import run_augment

        results = run_augment(cfg, workdir)
        print(json.dumps({k: results[k] for k in ("base", "p2rec", "wall_time_s")}, indent=2))
    else:
        raise app.UsageError(f"config.stage={cfg.stage!r} is not one of {STAGES}")


if __name__ == "__main__":
    app.run(main)
