"""The orchestration layer trains what a stage reads when it is missing; the trainers only read."""
import pytest

from configs import tiny
from rsllm_jax import stages
from rsllm_jax.train.rsllm_trainer import run_stage
from synthetic_data import use_custom_dataset
from tiny_llm import save_tiny_llm


def test_stage2_reads_only_and_build_missing_trains_stage0_and_stage1_first(tmp_path):
    c = use_custom_dataset(tiny.get_llm_config("stage2"), tmp_path)
    c.llm.model = str(save_tiny_llm(tmp_path / "tiny-llama"))
    c.train.max_train_samples = c.stage2.stage1_train_samples = 8
    c.sasrec.epochs = 1
    c.stage2.sasrec_dir, c.stage2.stage1_dir = "", ""  # the defaults: ../sasrec-custom and ../stage1
    workdir = str(tmp_path / "runs" / "stage2-custom")
    sasrec_dir, stage1_dir = stages.stage2_dirs(c, workdir)
    assert sasrec_dir.endswith("runs/sasrec-custom") and stage1_dir.endswith("runs/stage1")

    # The trainer alone never trains its dependencies: it names what is missing and how to get it.
    with pytest.raises(FileNotFoundError, match="sasrec-custom.*build_missing=True"):
        run_stage(c, workdir)
    c.stage2.build_missing = False
    stages.build_missing(c, workdir)  # not allowed: nothing is trained
    assert not (tmp_path / "runs" / "sasrec-custom").exists()

    c.stage2.build_missing = True
    stages.build_missing(c, workdir)
    assert stages.stage0_ready(sasrec_dir, with_user_states=True)
    assert (tmp_path / "runs" / "stage1" / "results.json").exists()
    res = run_stage(c, workdir)
    assert res["test"]["n"] > 0
