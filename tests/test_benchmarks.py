"""Smoke test of `python -m benchmarks.run`: every section end to end on a tiny random LLaMA.

Runs in a subprocess (the benchmark owns its absl flags and torch's thread count), with tiny shapes:
a 2-layer, 32-wide LLaMA saved as a Hugging Face checkpoint, 2 x 32 tokens, one timed repeat,
synthetic SASRec windows and a 128 x 128 matmul. Checks structure and numerics, never speed.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from tiny_llm import tiny_llm
from tiny_tokenizer import tiny_tokenizer

from rsllm_jax.checkpoint.hf import save_hf

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = pathlib.Path(__file__).resolve().parents[1]
THROUGHPUT = dict(train="tokens_per_s", decode="tokens_per_s", sasrec="samples_per_s")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    config, params, _ = tiny_llm()
    ckpt = save_hf(params, config, tmp / "tiny_llama")
    tiny_tokenizer().save_pretrained(ckpt)  # the windows section renders real prompts
    out = tmp / "out"
    cmd = [sys.executable, "-m", "benchmarks.run", f"--out={out}", f"--model={ckpt}", "--batch=2", "--seq_len=32",
           "--target_len=8", "--repeats=1", "--warmup=0", "--new_tokens=4", "--prompt_len=16", "--torch_threads=1",
           "--sasrec_data=synthetic", "--sasrec_samples=256", "--sasrec_batch=64", "--matmul_sizes=128",
           "--matmul_repeats=1", "--bandwidth_mib=16", "--windows=16"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| train (step) | jax |" in proc.stdout  # the table is printed
    assert (out / "bench.md").read_text().startswith("| workload |")
    return json.loads((out / "bench.json").read_text())


def test_every_section_has_finite_positive_numbers(results):
    for section, key in THROUGHPUT.items():
        for impl in ("jax", "torch"):
            r = results[section][impl]
            for k in ("median_s", "min_s", "max_s", key, "model_gflops_per_s", "mfu_vs_own_peak", "mfu_vs_machine_peak"):
                assert _positive(r[k]), (section, impl, k, r.get(k))
        assert _positive(results[section]["jax"]["compile_s"]), section
        assert _positive(results[section]["speedup"]), section
    peaks = results["matmul"]["peak_gflops"]
    assert all(_positive(peaks[k]) for k in ("jax", "torch", "machine"))
    assert _positive(results["matmul"]["memory_bandwidth"]["gb_per_s"])
    roof = results["decode_roofline"]
    assert 0 < roof["prefill_floor_s"] < roof["floor_s"] and _positive(roof["decode_steps_floor_s"])
    # A floor: neither framework can beat it (timing noise aside, at tiny sizes both are far above it).
    assert roof["jax_over_floor"] > 1 and roof["torch_over_floor"] > 1
    assert _positive(results["train"]["model_flops_per_step"])
    assert all(_positive(v) for v in results["train"]["counts"].values())
    assert set(results["flops"]) >= {"N", "train_step", "decode", "sasrec_step", "mfu"}


def test_windows_section_trains_real_prompts_in_both_frameworks(results):
    w = results["windows"]
    assert w["windows"] == 16 and w["batch"] == 8
    torch_r = w["torch"]
    assert _positive(torch_r["windows_per_s"]) and len(torch_r["step_s"]) == 2
    for name, r in w["jax"].items():
        assert _positive(r["windows_per_s"]) and _positive(r["compile_s"]) and len(r["step_s"]) == 2, name
        assert 0 <= r["padding_fraction"] < 1 and r["shapes"], name
    # Padding each batch to its own longest row wastes no more than any bucketing of the same batches.
    assert torch_r["padding_fraction"] <= min(r["padding_fraction"] for r in w["jax"].values()) + 1e-9
    # bf16 compute is a row of each framework, on the same batches.
    assert [r["compute"] for r in w["jax"].values()].count("bf16 matmuls, fp32 master weights") == 1
    assert _positive(w["torch_bf16"]["windows_per_s"]) and w["torch_bf16"]["compute"] == "bf16 autocast"
    assert all(_positive(v) for v in results["matmul"]["bf16_peak_gflops"].values())


def test_first_step_losses_agree_between_jax_and_torch(results):
    losses = results["train"]["losses"]
    assert losses["agree"], losses
    for k in ("loss", "nip", "l_ut", "l_tt"):
        assert _positive(losses[k]["jax"]) and abs(losses[k]["jax"] - losses[k]["torch"]) < 1e-3, (k, losses[k])
    assert losses["grad_norm"]["ok"], losses["grad_norm"]


def test_targets_are_reported(results):
    assert set(results["targets"]) == {"train_step_speedup_vs_torch>=1.5", "train_step_mfu>=0.5_of_machine_matmul_peak",
                                       "decode_speedup_vs_transformers>=2"}
    assert all(isinstance(v["met"], bool) for v in results["targets"].values())
    assert results["decode"]["shape"]["new_tokens"] == 4
    assert results["sasrec"]["data"] == "synthetic" and results["sasrec"]["steps_per_epoch"] == 4


def test_nce_pool_benchmark_times_both_pools(tmp_path):
    # benchmarks.nce_pool on a tiny random LLaMA: both variants run, and "step" pools the whole batch.
    config, params, _ = tiny_llm()
    ckpt = save_hf(params, config, tmp_path / "tiny_llama")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.nce_pool", f"--out={out}", f"--model={ckpt}", "--batch=4", "--accum=2",
           "--seq_len=32", "--target_len=8", "--repeats=1", "--warmup=0"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| `step` | 4 |" in proc.stdout and "| `micro_batch` | 2 |" in proc.stdout
    res = json.loads((out / "nce_pool.json").read_text())
    micro, step = res["variants"]
    assert (micro["pool"], step["pool"]) == ("micro_batch", "step")
    for v in (micro, step):
        assert _positive(v["median_s"]) and _positive(v["tokens_per_s"])
    # Same weights and batch: NIP agrees, the InfoNCE terms see 1 vs 3 negatives and differ.
    assert step["first_step"]["nip"] == pytest.approx(micro["first_step"]["nip"], rel=1e-5)
    assert step["first_step"]["l_ut"] != pytest.approx(micro["first_step"]["l_ut"], rel=1e-3)
