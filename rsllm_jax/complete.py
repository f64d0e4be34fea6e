"""Text continuation from the command line.

    python -m rsllm_jax.complete --model=smollm2 --chat --prompt="Recommend three science fiction movies."
    python -m rsllm_jax.complete --model=/path/to/hf_dir --prompt="Once upon a time" --max_new_tokens=64 \
        --temperature=0.8 --top_p=0.95 --seed=1

Greedy by default; generation stops at EOS (and, with --stop_newline, at the first newline).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from rsllm_jax.checkpoint.loader import load_llm
from rsllm_jax.models.generate import generate, left_pad, stop_token_ids
from rsllm_jax.models.llama import Llama

_MODEL = flags.DEFINE_string("model", "smollm2", "'smollm2', a .gguf file, or a Hugging Face checkpoint dir")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Maximum number of generated tokens")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt with the tokenizer's chat template")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0)")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed")
_STOP_NEWLINE = flags.DEFINE_bool("stop_newline", False, "Also stop at the first newline")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype")


def encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    config, params, tokenizer = load_llm(_MODEL.value, dtype=dtype, param_dtype=dtype)
    model = Llama(config, dtype=dtype, param_dtype=dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([encode(tokenizer, p, _CHAT.value) for p in _PROMPT.value], pad_id)
    stops = stop_token_ids(tokenizer, ("\n",) if _STOP_NEWLINE.value else ())
    tokens, lengths = generate(
        model, params, ids, attention_mask=mask, max_new_tokens=_MAX_NEW.value, stop_ids=stops,
        rng=jax.random.key(_SEED.value), temperature=_TEMPERATURE.value, top_p=_TOP_P.value, pad_id=pad_id,
    )
    tokens, lengths = jax.device_get((tokens, lengths))
    for row, n in zip(tokens, lengths):
        print(tokenizer.decode(row[:n], skip_special_tokens=True))


if __name__ == "__main__":
    app.run(main)
