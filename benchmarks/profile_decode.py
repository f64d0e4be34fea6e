"""Where evaluation decoding spends its time on this CPU: prefill vs per-token decode, against the
memory-bandwidth roofline, plus a jax.profiler trace aggregated by XLA operation.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python -m benchmarks.profile_decode --out=results/bench/profile_decode
Prints the split and the top operations; writes DIR/decode_profile.json (the raw trace stays in DIR).

A greedy decode step reads every weight once for the whole batch (matrix-vector work), so on a CPU
its floor is bytes moved / memory bandwidth, not FLOPs / matmul peak: with f32 SmolLM2-135M that is
~540 MB per step whatever the framework.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from benchmarks import llm_setup, timing, workload
from benchmarks.section_decode import jax_decoder, llm_weight_bytes
from benchmarks.section_matmul import memory_bandwidth
from benchmarks.trace_stats import categories, top_ops

_OUT = flags.DEFINE_string("out", "results/bench/profile_decode", "Trace directory")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows")
_PROMPT = flags.DEFINE_integer("prompt_len", 256, "Prompt tokens per row")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per setting")


def main(argv) -> None:
    del argv
    llm = llm_setup.load("smollm2", True)
    setup = llm_setup.build(llm, scan_layers=True, target_len=24)
    vocab = setup.built.model.config.llm.vocab_size
    prompts = workload.prompt_batch(batch=_BATCH.value, prompt_len=_PROMPT.value, vocab=vocab)
    weight_bytes = llm_weight_bytes(setup.built.params["llm"])
    bw = memory_bandwidth()
    out = dict(shape=dict(batch=_BATCH.value, prompt_len=_PROMPT.value, new_tokens=_NEW.value),
               memory_bandwidth_gb_s=bw["gb_per_s"], llm_weight_bytes=int(weight_bytes))
    for merged in (False, True):
        decode_1 = jax_decoder(setup, prompts, 1, merge=merged)
        decode_n = jax_decoder(setup, prompts, _NEW.value, merge=merged)
        with setup.context():
            decode_1(), decode_n()  # compile both
            t1 = timing.repeat(decode_1, repeats=_REPEATS.value, warmup=1)["median_s"]
            tn = timing.repeat(decode_n, repeats=_REPEATS.value, warmup=1)["median_s"]
        per_step = (tn - t1) / (_NEW.value - 1)
        out["merged_lora" if merged else "unmerged_lora"] = dict(
            prefill_plus_first_token_s=t1, full_call_s=tn, decode_step_ms=per_step * 1e3,
            decode_tokens_per_s=_BATCH.value / per_step,
            # Lower bound on a step: every weight streamed from memory once.
            step_floor_ms=weight_bytes / (bw["gb_per_s"] * 1e9) * 1e3,
        )
        print(f"LoRA {'merged  ' if merged else 'unmerged'}: prefill+1 {t1:.2f} s, {_NEW.value} tokens {tn:.2f} s, "
              f"decode step {per_step * 1e3:.1f} ms (floor {out['merged_lora' if merged else 'unmerged_lora']['step_floor_ms']:.1f} ms "
              f"at {bw['gb_per_s']:.1f} GB/s)")
    decode_n = jax_decoder(setup, prompts, _NEW.value, merge=True)
    with setup.context():
        decode_n()
        jax.profiler.start_trace(_OUT.value)
        decode_n()
        jax.profiler.stop_trace()
    rows = top_ops(_OUT.value)
    for name, ms, c in rows:
        print(f"{ms:10.1f} ms  x{c:<5d} {name[:110]}")
    out["top_ops"] = rows
    out["per_call_ms_by_kind"] = categories(_OUT.value, 1)
    for k, v in out["per_call_ms_by_kind"].items():
        print(f"  {k:40s} {v:9.1f} ms")
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "decode_profile.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    app.run(main)
