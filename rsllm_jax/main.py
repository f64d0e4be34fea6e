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

STAGES = ("sasrec", "stage1", "stage2", "eval")


class _OwnInfoOnly(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "rsllm_jax" in record.pathname


def _log_runtime() -> None:
    import jax

    logging.info(
        "jax %s: process %d/%d, %d local / %d global devices (%s)",
        jax.__version__, jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform,
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
    workdir = _WORKDIR.value or default_workdir(cfg)
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("log", workdir)
    logging.set_stderrthreshold("info")
    # Libraries (orbax, grain) log every save/restore at INFO: keep their warnings, drop the chatter.
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    _log_runtime()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))

    if cfg.stage == "sasrec":
        from rsllm_jax.train.sasrec_trainer import train_sasrec

        results = train_sasrec(cfg, workdir)
        print(json.dumps({"val": results["val"], "test": results["test"], "wall_time_s": results["wall_time_s"]}, indent=2))
    elif cfg.stage in ("stage1", "stage2"):
        from rsllm_jax.train.rsllm_trainer import run_stage

        results = run_stage(cfg, workdir)
        print(json.dumps({k: results[k] for k in ("val", "test", "wall_time_s", "train_samples")}, indent=2))
    elif cfg.stage == "eval":
        from rsllm_jax.train.rsllm_trainer import run_eval

        print(json.dumps(run_eval(cfg, workdir), indent=2))
    else:
        raise app.UsageError(f"config.stage={cfg.stage!r} is not one of {STAGES}")


if __name__ == "__main__":
    app.run(main)
