"""SmolLM2-135M on this machine: JAX vs transformers/PyTorch, same batch and lengths, one run.

    python benchmarks/llama_bench.py --batch=4 --seq_len=128 --new_tokens=32 --out=benchmarks/llama_bench.json

Measures (fp32, same dequantized GGUF weights in both frameworks):
  * train step: forward + backward of the mean next-token cross-entropy w.r.t. all LLM weights, tokens/s;
  * greedy decode: prefill a `prompt_len` prompt, then exactly `new_tokens` tokens per row with a KV cache,
    generated tokens/s (prefill time included, as a user sees it).
JAX is compiled and warmed up first; the reported time is the median over `repeats`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax
from absl import app, flags

from rsllm_jax.checkpoint.loader import load_llm
from rsllm_jax.checkpoint.smollm2 import ensure_smollm2
from rsllm_jax.models.generate import generate
from rsllm_jax.models.llama import Llama

_BATCH = flags.DEFINE_integer("batch", 4, "Batch size (both workloads)")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length of the train step")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt length for decoding")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Generated tokens per row")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported)")
_SCAN = flags.DEFINE_bool("scan_layers", False, "Use the scanned layer stack in JAX")
_TORCH = flags.DEFINE_bool("torch", True, "Also measure transformers/PyTorch")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = torch's default)")
_OUT = flags.DEFINE_string("out", "benchmarks/llama_bench.json", "Where to write the JSON results")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_jax(ids: np.ndarray, prompt: np.ndarray) -> dict[str, float]:
    config, params, _ = load_llm("smollm2", with_tokenizer=False, scan_layers=_SCAN.value)
    model = Llama(config)

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    compile_start = time.perf_counter()
    jax.block_until_ready(step(params, ids))
    train_compile = time.perf_counter() - compile_start
    train_s = median_time(lambda: jax.block_until_ready(step(params, ids)), _REPEATS.value)

    mask = np.ones_like(prompt)

    def decode():
        return jax.block_until_ready(generate(model, params, prompt, attention_mask=mask, max_new_tokens=_NEW.value))

    compile_start = time.perf_counter()
    decode()
    decode_compile = time.perf_counter() - compile_start
    decode_s = median_time(decode, _REPEATS.value)
    return dict(
        train_step_s=train_s, train_tokens_per_s=ids[:, :-1].size / train_s, train_compile_s=train_compile,
        decode_s=decode_s, decode_tokens_per_s=prompt.shape[0] * _NEW.value / decode_s,
        decode_compile_s=decode_compile,
    )


def bench_torch(ids: np.ndarray, prompt: np.ndarray) -> dict[str, float]:
    import torch
    import transformers

    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    path = ensure_smollm2()
    model = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tids = torch.tensor(ids, dtype=torch.long)

    def train():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tids[:, 1:].flatten())
        loss.backward()

    model.train()
    train()  # warm-up
    train_s = median_time(train, _REPEATS.value)

    model.eval()
    tprompt = torch.tensor(prompt, dtype=torch.long)

    def decode():
        with torch.no_grad():
            model.generate(
                input_ids=tprompt, attention_mask=torch.ones_like(tprompt), max_new_tokens=_NEW.value,
                min_new_tokens=_NEW.value, do_sample=False, pad_token_id=0,
            )

    decode()
    decode_s = median_time(decode, _REPEATS.value)
    return dict(
        train_step_s=train_s, train_tokens_per_s=ids[:, :-1].size / train_s,
        decode_s=decode_s, decode_tokens_per_s=prompt.shape[0] * _NEW.value / decode_s,
        torch_threads=torch.get_num_threads(),
    )


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, size=(_BATCH.value, _SEQ.value + 1)).astype(np.int32)
    prompt = rng.integers(3, 49152, size=(_BATCH.value, _PROMPT.value)).astype(np.int32)
    results = {"jax": bench_jax(ids, prompt)}
    if _TORCH.value:
        results["torch"] = bench_torch(ids, prompt)
    results["setup"] = dict(
        model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", dtype="float32",
        batch=_BATCH.value, seq_len=_SEQ.value, prompt_len=_PROMPT.value, new_tokens=_NEW.value,
        scan_layers=_SCAN.value, cpu_count=os.cpu_count(), load_average=os.getloadavg(),
        jax=jax.__version__, jax_devices=str(jax.devices()), machine=platform.processor() or platform.machine(),
    )
    print(f"{'':<8}{'fwd+bwd tok/s':>15}{'step s':>9}{'decode tok/s':>14}{'decode s':>10}")
    for name in ("jax", "torch"):
        if name in results:
            r = results[name]
            print(f"{name:<8}{r['train_tokens_per_s']:>15.1f}{r['train_step_s']:>9.3f}"
                  f"{r['decode_tokens_per_s']:>14.1f}{r['decode_s']:>10.3f}")
    print(f"batch={_BATCH.value} seq_len={_SEQ.value} prompt_len={_PROMPT.value} new_tokens={_NEW.value} "
          f"load_average={os.getloadavg()}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
