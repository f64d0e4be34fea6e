"""Two JAX processes on 127.0.0.1 (4 fake CPU devices each) == one process with 8 fake devices.

The real entry point runs the tiny stage-2 config in both layouts on a 2x2x2 (data, fsdp, tensor)
mesh: the per-step losses, the trained parameters in the orbax checkpoint and the evaluation metrics
must agree. This exercises jax.distributed, per-process Grain slicing with bucket agreement, global
batch assembly, multi-process orbax saves and evaluation with every process reading the same rows.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from rsllm_jax.checkpoint.run_dirs import restore_trainable
from synthetic_data import write_custom_dataset
from tiny_llm import save_tiny_llm

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    model_dir = save_tiny_llm(tmp / "tiny-llama")
    inter, items = write_custom_dataset(tmp / "data")
    sasrec = tmp / "sasrec"
    sasrec.mkdir()
    np.save(sasrec / "item_embeddings.npy", np.random.default_rng(0).normal(size=(30, 64)).astype(np.float32))
    flags = [
        "--config=configs/tiny.py:stage2", f"--config.llm.model={model_dir}", "--config.data.dataset=custom",
        f"--config.data.custom_interactions={inter}", f"--config.data.custom_items={items}",
        f"--config.data.cache_dir={tmp / 'cache'}", f"--config.stage2.sasrec_dir={sasrec}",
        "--config.stage2.stage1_dir=none", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
        "--config.train.max_train_samples=48", "--config.log_every_steps=1", "--config.eval.max_rows=8",
        "--config.lora.dropout=0.0",
    ]
    return tmp, flags


def _metrics(workdir: pathlib.Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"nip"' in line]


def test_two_processes_equal_one(setup):
    tmp, flags = setup
    one = tmp / "one"
    subprocess.run([sys.executable, "-m", "rsllm_jax.main", *flags, f"--workdir={one}"], cwd=REPO, env=_env(8),
                   check=True, timeout=900)
    two = tmp / "two"
    port = _free_port()
    # Output goes to files, not pipes: a pipe nobody reads while we wait on the other process fills up
    # (XLA's partitioner warnings are long) and blocks that process before jax.distributed shutdown.
    logs = [open(tmp / f"process{i}.log", "w+") for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "rsllm_jax.main", *flags, f"--workdir={two}",
                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                         cwd=REPO, env=_env(4), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    for p in procs:
        p.wait(timeout=900)
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "process 1/2, 4 local / 8 global devices" in outs[1]

    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) >= 3
    for a, b in zip(m1, m2):
        for k in ("loss", "nip", "l_ut", "l_tt"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {k}")
    p1, p2 = restore_trainable(str(one)), restore_trainable(str(two))
    flat1 = {k: v for k, v in _flatten(p1)}
    flat2 = {k: v for k, v in _flatten(p2)}
    assert flat1.keys() == flat2.keys() and flat1
    for k in flat1:
        np.testing.assert_allclose(flat2[k], flat1[k], rtol=1e-3, atol=1e-5, err_msg=k)
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((two / "results.json").read_text())
    for k in ("n", "valid_ratio", "accuracy", "two_tower_hr1", "two_tower_hr10"):
        assert r1["test"][k] == pytest.approx(r2["test"][k], abs=1e-6), k
    # Only process 0 writes the run's files: one metrics line per logged step, not two.
    assert [m["step"] for m in m2] == sorted({m["step"] for m in m2})


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)
