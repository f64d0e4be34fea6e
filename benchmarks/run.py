"""rsllm_jax vs PyTorch on this machine, one process: train step, decoding, SASRec, matmul peak, MFU.

    python -m benchmarks.run --out=runs/bench                   # SmolLM2-135M, 4 x 256 (+ 4 x 24), all sections
    python -m benchmarks.run --out=/tmp/b --only=train,matmul   # a subset
    python -m benchmarks.run --out=/tmp/b --model=/path/to/hf_dir --batch=2 --seq_len=32   # any LLaMA checkpoint

Sections (--only picks a comma list; default all):
  matmul  f32 matmul GFLOP/s of jnp.dot and torch.matmul (the MFU denominators; run first, machine idle),
          and streaming memory bandwidth (the floor of memory-bound decoding)
  train   stage-2 train step (NIP + L_UT + L_TT, LoRA r=8 alpha=32 on q,k,v,o,gate,up,down, projector,
          Adam): rsllm_jax's jitted step vs a LLaRA-style transformers + peft reference with the same
          weights and batch; checks their first-step losses agree
  decode  greedy generation of exactly --new_tokens per row: rsllm_jax generate vs transformers generate
  sasrec  one SASRec training epoch: rsllm_jax vs a plain PyTorch SASRec of the same size
  windows stage-2 training windows/s on real MovieLens prompts of the default recipe (LoRA dropout as
          configured): JAX with the configs' length buckets (FINE_BUCKETS) and the coarser ones before
          them vs PyTorch padding each batch to its longest row (needs the model's tokenizer)
Writes DIR/bench.json (every number, the FLOP formulas, the setup) and DIR/bench.md (the table) and
prints the table. FLOP formulas: benchmarks/flops.py. Times are wall clock, median over --repeats
after --warmup untimed calls (and, for JAX, after compilation, which is reported separately).

Run it on an otherwise idle machine (a warning is logged when the load average says otherwise): on a
busy box torch's OpenMP threads spin-wait and its times collapse (a 2-core box shared with another
job made a train step ~40x slower with torch's default 2 threads than with --torch_threads=1).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform

import jax
import numpy as np
import torch
import transformers
from absl import app, flags, logging

from benchmarks import (flops, llm_setup, report, section_decode, section_matmul, section_sasrec,
                        section_train, section_windows)

SECTIONS = ("matmul", "train", "decode", "sasrec", "windows")

_OUT = flags.DEFINE_string("out", "runs/bench", "Directory for bench.json and bench.md")
_MODEL = flags.DEFINE_string("model", "smollm2", "'smollm2', a .gguf file or a Hugging Face LLaMA checkpoint dir")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per train step and per decode call")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row of the train step's main pass")
_TARGET = flags.DEFINE_integer("target_len", 24, "Tokens per row of the second tower (target item alone)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (train steps, decode calls, SASRec epochs)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (after the first / compiling call)")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row (EOS never stops a row)")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "Prompt tokens per row for decoding")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = torch's default)")
_ONLY = flags.DEFINE_list("only", [], f"Sections to run, from {SECTIONS} (default: all)")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scanned layer stack in JAX (the configs' default)")
_REMAT = flags.DEFINE_enum("remat_policy", "dots_no_batch", ["none", "full", "dots", "dots_no_batch"],
                           "config.llm.remat_policy of the JAX train step (configs/base.py's default)")
_SAS_DATA = flags.DEFINE_enum("sasrec_data", "auto", ["auto", "movielens", "synthetic"],
                              "SASRec windows: the real MovieLens split (auto: when $RSLLM_DATA_DIR is set) or synthetic")
_SAS_SAMPLES = flags.DEFINE_integer("sasrec_samples", 60000, "Synthetic SASRec records per epoch")
_SAS_BATCH = flags.DEFINE_integer("sasrec_batch", 256, "SASRec batch size (configs/base.py's)")
_DROPOUT = flags.DEFINE_float("lora_dropout", 0.0, "LoRA dropout of both train steps (the configs train with 0.1; "
                              "0 makes the first-step losses comparable, >0 measures what dropout costs)")
_WINDOWS = flags.DEFINE_integer("windows", 64, "Real training windows the windows section trains (both frameworks)")
_WIN_BF16 = flags.DEFINE_bool("windows_bf16", True, "Windows section: also bf16 compute (JAX: bf16 matmuls with fp32 "
                                "master weights; PyTorch: torch.autocast bf16)")
_WIN_DROPOUT = flags.DEFINE_float("windows_lora_dropout", 0.1, "LoRA dropout of the windows section (the configs')")
_MM_SIZES = flags.DEFINE_list("matmul_sizes", ["2048", "3072", "4096"], "Square matmul sizes for the peak")
_MM_REPEATS = flags.DEFINE_integer("matmul_repeats", 5, "Matmuls per size (best is kept)")
_BW_MIB = flags.DEFINE_integer("bandwidth_mib", 512, "Array size of the memory-bandwidth probe (far above cache)")


def setup_info() -> dict:
    return dict(
        model=_MODEL.value, dtype="float32", date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(), platform=platform.platform(),
        jax=jax.__version__, jax_device=str(jax.devices()[0]), jax_devices_visible=jax.device_count(),
        torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads(),
        scan_layers=_SCAN.value, remat_policy=_REMAT.value, load_average_start=os.getloadavg(),
        lora_dropout=_DROPOUT.value,
        notes="1-device JAX mesh; LoRA dropout --lora_dropout on both sides (0 is needed for loss agreement); "
              "grad_accum_steps=1 (the batch is one micro-batch); synthetic fixed-length prompts "
              "(benchmarks/workload.py), same arrays for both frameworks",
    )


def _warn_if_busy() -> str | None:
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.5 * cpus:
        return None
    msg = f"load average {load:.1f} on {cpus} CPUs: the machine is busy, timings are not representative"
    logging.warning(msg)
    return msg


def _sections() -> list[str]:
    chosen = _ONLY.value or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"--only: unknown sections {unknown}; choose from {SECTIONS}")
    return [s for s in SECTIONS if s in chosen]  # fixed order: the matmul peak first, on an idle machine


def run_llm_section(name: str, llm) -> dict:
    # A fresh model per section (the JAX train step donates its state); dropped afterwards to free memory.
    setup = llm_setup.build(llm, scan_layers=_SCAN.value, target_len=_TARGET.value, remat_policy=_REMAT.value,
                            lora_dropout=_DROPOUT.value if name == "train" else 0.0)
    try:
        if name == "train":
            return section_train.run(setup, batch=_BATCH.value, seq_len=_SEQ.value, target_len=_TARGET.value,
                                     repeats=_REPEATS.value, warmup=_WARMUP.value)
        return section_decode.run(setup, batch=_BATCH.value, prompt_len=_PROMPT.value, new_tokens=_NEW.value,
                                  repeats=_REPEATS.value, warmup=_WARMUP.value)
    finally:
        del setup
        gc.collect()


def run_windows_section(llm) -> dict:
    from rsllm_jax.checkpoint.loader import load_llm
    from rsllm_jax.data.prompts import FINE_BUCKETS

    tokenizer = load_llm(_MODEL.value, with_tokenizer=True, scan_layers=_SCAN.value)[2]
    if tokenizer is None:
        raise app.UsageError(f"--model={_MODEL.value} has no tokenizer: the windows section renders real prompts")
    setup = llm_setup.build(llm, scan_layers=_SCAN.value, target_len=_TARGET.value, remat_policy=_REMAT.value,
                            lora_dropout=_WIN_DROPOUT.value)
    try:
        windows = section_windows.real_windows(tokenizer, setup.built.model.config.llm.vocab_size, _WINDOWS.value)
        batch = setup.cfg.train.batch_size
        bf16 = llm_setup.build(llm, scan_layers=_SCAN.value, target_len=_TARGET.value, remat_policy=_REMAT.value,
                               lora_dropout=_WIN_DROPOUT.value, dtype="bfloat16",
                               with_torch=False) if _WIN_BF16.value else None
        res = section_windows.run(setup, windows, batch=batch, bucket_sets={
            "buckets 256, 384, ... (before)": section_windows.COARSE_BUCKETS,
            "FINE_BUCKETS (the configs')": FINE_BUCKETS}, bf16_setup=bf16)
        res["lora_dropout"] = _WIN_DROPOUT.value
        return res
    finally:
        del setup
        gc.collect()


def run_all(sections: list[str]) -> dict:
    results: dict = {"setup": setup_info(), "flops": flops.FORMULAS}
    results["setup"]["busy_warning"] = _warn_if_busy()
    llm = None
    for name in sections:
        logging.info("section %s ...", name)
        if name == "matmul":
            results[name] = section_matmul.run(sizes=[int(s) for s in _MM_SIZES.value], repeats=_MM_REPEATS.value,
                                               bandwidth_mib=_BW_MIB.value)
        elif name in ("train", "decode"):
            llm = llm or llm_setup.load(_MODEL.value, _SCAN.value)
            results[name] = run_llm_section(name, llm)
        elif name == "windows":
            llm = llm or llm_setup.load(_MODEL.value, _SCAN.value)
            results[name] = run_windows_section(llm)
        else:
            results[name] = section_sasrec.run(source=_SAS_DATA.value, synthetic_samples=_SAS_SAMPLES.value,
                                               batch=_SAS_BATCH.value, epochs=_REPEATS.value, warmup=_WARMUP.value)
    if llm is not None:
        c = llm[0]
        results["setup"]["llm"] = dict(vocab=c.vocab_size, d=c.hidden_size, ffn=c.intermediate_size, layers=c.num_layers,
                                       heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                       tied_embeddings=c.tie_word_embeddings, total_params=c.num_params())
    results["setup"]["load_average_end"] = os.getloadavg()
    report.add_mfu(results)
    results["targets"] = report.targets(results)
    roof = report.decode_roofline(results)
    if roof:
        results["decode_roofline"] = roof
    return results


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def main(argv: list[str]) -> None:
    del argv
    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    results = run_all(_sections())
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench.json"), "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    table = report.markdown(results)
    with open(os.path.join(_OUT.value, "bench.md"), "w") as f:
        f.write(table)
    print(table)
    for k, v in results["targets"].items():
        print(f"target {k}: {v['value']:.3g} -> {'MET' if v['met'] else 'NOT met'}")


if __name__ == "__main__":
    app.run(main)
