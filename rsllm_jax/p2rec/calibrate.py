"""How well SASRec's category prior predicts each training user's next-item category, per softmax temperature:
the calibration `configs/p2rec_reconstruct.py` runs when config.p2rec.prior_temperature = 0, on its own.

python -m rsllm_jax.p2rec.calibrate --config=configs/p2rec_reconstruct.py --config.data.dataset=movielens \
    --config.p2rec.sasrec_dir=runs/sasrec-movielens [--out=calibration-movielens.json]
Prints the NLL / mean prior entropy table (T = 1 and the calibrated T marked) and writes it as JSON.
"""
from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rsllm_jax.data.splits import load_split_from_config
from rsllm_jax.models.sasrec import item_table
from rsllm_jax.checkpoint.run_dirs import restore_subtree
from rsllm_jax.p2rec.reconstruct import calibrate_on_training_users, kmeans


def calibration_report(cfg) -> dict:
    """The same categories (k-means on SASRec's item table) and calibration as the reconstruction stage."""
    p = cfg.p2rec
    if not p.sasrec_dir:
        raise ValueError("set --config.p2rec.sasrec_dir to a finished stage-0 SASRec run")
    split = load_split_from_config(cfg.data)
    params, _ = restore_subtree(p.sasrec_dir, "params")
    _, assign = kmeans(np.asarray(item_table(params), np.float32), p.num_categories, iters=p.kmeans_iters,
                       seed=p.kmeans_seed)
    best, table = calibrate_on_training_users(params, split.train, assign, p.num_categories, cfg.data.max_history)
    at_one = min(table, key=lambda r: abs(np.log(r["temperature"])))
    return dict(dataset=split.dataset, sasrec_dir=p.sasrec_dir, num_categories=p.num_categories,
                log_num_categories=float(np.log(p.num_categories)), calibrated_temperature=best,
                nll_calibrated=min(r["nll"] for r in table), nll_at_t1=at_one["nll"],
                entropy_at_t1=at_one["mean_entropy"], table=table)


def main(argv) -> None:
    del argv
    report = calibration_report(flags.FLAGS.config)
    print(f"{report['dataset']}: K = {report['num_categories']} (log K = {report['log_num_categories']:.3f})")
    print("| T | NLL of the next item's category | mean prior entropy |\n|---|---|---|")
    for r in report["table"]:
        mark = " (calibrated)" if r["temperature"] == report["calibrated_temperature"] else ""
        print(f"| {r['temperature']:.3g}{mark} | {r['nll']:.4f} | {r['mean_entropy']:.4f} |")
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "configs/p2rec_reconstruct.py", lock_config=True)
    flags.DEFINE_string("out", None, "Also write the report as JSON here.")
    app.run(main)
