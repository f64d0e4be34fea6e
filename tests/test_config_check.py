"""Start-up config checks: each bad value is one line naming the field, before data or compilation."""
import os
import subprocess
import sys

import pytest

from configs import base, tiny
from rsllm_jax.config_check import ConfigError, check


def _cfg(stage="stage2", **overrides):
    c = tiny.get_llm_config(stage) if stage in ("stage1", "stage2", "eval") else tiny.get_config()
    for dotted, value in overrides.items():
        node = c
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def test_the_shipped_configs_pass():
    check(base.get_config(), num_devices=8)
    for stage in ("stage1", "stage2", "eval"):
        check(tiny.get_llm_config(stage), num_devices=8)
    check(tiny.get_config(), num_devices=8)


@pytest.mark.parametrize("overrides,stage,devices,message", [
    (dict(train__batch_size=10, train__grad_accum_steps=4), "stage2", 1,
     r"config.train.batch_size=10 is not divisible by config.train.grad_accum_steps=4"),
    (dict(train__batch_size=12, train__grad_accum_steps=2), "stage2", 8,
     r"batch_size=12 is not divisible by the 8 data-parallel devices \(mesh data x fsdp = 8 x 1\)"),
    (dict(mesh__data=3), "stage2", 8, r"config.mesh: mesh: data\*fsdp\*tensor = 3 but 8 devices"),
    (dict(mesh__data=-1, mesh__fsdp=3), "stage1", 8, r"8 devices are not divisible by the fixed axes"),
    (dict(train__batch_size=0), "stage2", 1, r"config.train.batch_size=0: expected a positive integer"),
    (dict(train__grad_accum_steps=-2), "stage1", 1, r"config.train.grad_accum_steps=-2"),
    (dict(optim__lr=float("nan")), "stage2", 1, r"config.optim.lr=nan: expected a positive finite number"),
    (dict(optim__lr=float("inf")), "stage2", 1, r"config.optim.lr=inf"),
    (dict(optim__lr=0.0), "stage2", 1, r"config.optim.lr=0.0"),
    (dict(train__max_train_samples=-1), "stage2", 1, r"config.train.max_train_samples=-1: expected a non-negative"),
    (dict(eval__batch_size=0), "eval", 1, r"config.eval.batch_size=0"),
    (dict(data__num_candidates=1), "eval", 1, r"num_candidates=1: a choice needs >= 2"),
    (dict(sasrec__lr=-1e-3), "sasrec", 1, r"config.sasrec.lr=-0.001"),
    (dict(sasrec__batch_size=0), "sasrec", 1, r"config.sasrec.batch_size=0"),
])
def test_bad_values_name_the_field(overrides, stage, devices, message):
    with pytest.raises(ConfigError, match=message):
        check(_cfg(stage, **overrides), num_devices=devices)


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check(_cfg(), num_devices=1, workdir=str(f))
    check(_cfg(), num_devices=1, workdir=str(tmp_path / "new" / "run"))  # created later: fine
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ConfigError, match="not a writable directory"):
            check(_cfg(), num_devices=1, workdir=str(ro / "run"))


def test_main_prints_one_line_and_writes_nothing(tmp_path):
    work = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "rsllm_jax.main", "--config=configs/tiny.py", f"--workdir={work}",
                        "--config.sasrec.lr=nan"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode != 0
    assert "config.sasrec.lr=nan: expected a positive finite number" in r.stderr
    assert "Traceback" not in r.stderr and not work.exists()
