"""Section 2: evaluation decoding, rsllm_jax's batched KV-cache greedy `generate` vs transformers'
`generate(do_sample=False)`.

Both run the evaluation path of a stage-2 model: hybrid prompt embeddings (projected IDs spliced at
the slots) fed as `inputs_embeds` to the LoRA-adapted LLM (rsllm_jax: eval/evaluate.py's
RSLLM.embed + models/generate.py; PyTorch: LLaRA's peft model `generate(inputs_embeds=...)`).
Same prompts, same length, exactly `new_tokens` per row on both sides (no stop ids in JAX, EOS
disabled in transformers). Timed per call: embedding the prompt + folding LoRA into the kernels (JAX,
as the Evaluator does once per evaluation) + prefill + decode loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import flops, timing, workload
from benchmarks.llm_setup import Setup
from rsllm_jax.models.generate import for_inference, generate
from rsllm_jax.models.llama import Llama
from rsllm_jax.models.rsllm import RSLLM


def llm_weight_bytes(llm_params) -> int:
    """Bytes of the LLM's weights without the LoRA factors (which decoding folds into the kernels): what
    every decode step streams from memory once."""
    return int(sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(llm_params)
                   if "lora" not in jax.tree_util.keystr(path)))


def jax_decoder(setup: Setup, prompts: dict, new_tokens: int, merge: bool = True):
    """A blocking call doing what the Evaluator does per batch: embed the prompt, fold LoRA into the base
    kernels (`for_inference`, once per evaluation; `merge=False` keeps the factors), greedy-decode."""
    model, params = setup.built.model, setup.built.params
    llm = Llama(model.config.llm, dtype=model.dtype, param_dtype=model.param_dtype, lora=model.lora)
    embed = jax.jit(lambda p, ids, slots: model.apply({"params": p}, ids, slots, method=RSLLM.embed))
    mask = jnp.asarray(prompts["attention_mask"])

    def decode():
        embeds = embed(params, prompts["input_ids"], prompts["slot_items"])
        dec, dec_params = for_inference(llm, params["llm"]) if merge else (llm, params["llm"])
        tokens, _ = generate(dec, dec_params, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens)
        return np.asarray(jax.block_until_ready(tokens))

    return decode


def run_jax(setup: Setup, prompts: dict, new_tokens: int, repeats: int, warmup: int) -> dict:
    decode = jax_decoder(setup, prompts, new_tokens)
    with setup.context():
        first_s, tokens = timing.timed(decode)  # traces and compiles the embedding and generate programs
        times = timing.repeat(decode, repeats=repeats, warmup=warmup)
    return dict(**times, first_call_s=first_s, compile_s=max(first_s - times["median_s"], 0.0),
                compile_note="first call (trace + compile + run) minus the median call", tokens=tokens)


def run_torch(setup: Setup, prompts: dict, new_tokens: int, repeats: int, warmup: int) -> dict:
    model = setup.torch_model.eval()
    t = {k: torch.from_numpy(np.asarray(v)).long() for k, v in prompts.items()}

    def decode():
        return model.generate(t["input_ids"], t["slot_items"], t["attention_mask"], new_tokens).numpy()

    first_s, tokens = timing.timed(decode)
    times = timing.repeat(decode, repeats=repeats, warmup=warmup)
    return dict(**times, first_call_s=first_s, tokens=tokens, torch_threads=torch.get_num_threads())


def run(setup: Setup, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int) -> dict:
    vocab = setup.built.model.config.llm.vocab_size
    prompts = workload.prompt_batch(batch=batch, prompt_len=prompt_len, vocab=vocab)
    lora = setup.built.model.lora
    counts = flops.llm_counts(setup.built.model.config.llm, lora.rank, lora.targets, workload.REC_DIM)
    slots = int((prompts["slot_items"] >= 0).sum())
    jax_res = run_jax(setup, prompts, new_tokens, repeats, warmup)
    torch_res = run_torch(setup, prompts, new_tokens, repeats, warmup)
    a, b = jax_res.pop("tokens"), torch_res.pop("tokens")
    if a.shape != b.shape:
        raise AssertionError(f"decode produced {a.shape} (jax) vs {b.shape} (torch) tokens: expected "
                             f"exactly {new_tokens} per row on both sides")
    for r in (jax_res, torch_res):
        r["tokens_per_s"] = batch * new_tokens / r["median_s"]
    return dict(
        jax=jax_res, torch=torch_res, model_flops_per_call=flops.decode_flops(counts, batch, prompt_len, new_tokens, slots),
        prefill_flops=flops.prefill_flops(counts, batch, prompt_len), llm_weight_bytes=llm_weight_bytes(setup.built.params["llm"]),
        shape=dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens),
        # Informational: fp32 summation-order differences can flip a near-tie argmax, after which rows diverge.
        greedy_tokens_equal_fraction=float((a == b).mean()), greedy_rows_identical=int((a == b).all(1).sum()),
        speedup=torch_res["median_s"] / jax_res["median_s"],
    )
