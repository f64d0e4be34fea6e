"""Model FLOPs of each benchmarked workload, written out so MFU can be checked by hand.

Conventions (a multiply-add is 2 FLOPs; only matmuls are counted; norms, softmax, RoPE, losses and the
optimizer update are left out):

  N        = matmul weights of the decoder layers = L * (d*Dh*(2H + 2KV) + 3*d*F)   ("non-embedding"
             parameters; the 2*L*d + d norm scales are not matmuls and are excluded)
  N_head   = d * V: the LM head (tied or not), applied only where logits are needed
  N_lora   = L * sum over adapted projections of r * (fan_in + fan_out)
  N_proj   = d_rec*d + d*d: the projector, applied only at ID-slot positions

  Attention per token per layer with S visible keys: forward QK^T 2*S*H*Dh + PV 2*S*H*Dh = 4*S*H*Dh;
  backward w.r.t. activations (dQ, dK, dP, dV) = 8*S*H*Dh; forward + backward = 12*S*H*Dh.
  Both implementations run the dense S x S attention under a mask, so S = the padded length T
  (no causal halving: we count what is executed and needed, as MaxText does for non-causal kernels).

Stage-2 train step (LoRA on a frozen base, one optimizer step over B rows of T tokens plus the
second tower's B rows of T_t tokens):
  per main-pass token   4*N + 4*N_head + 6*N_lora + 12*L*H*Dh*T
  per target-pass token 4*N            + 6*N_lora + 12*L*H*Dh*T_t    (no logits on that pass)
  per ID slot           6*N_proj
  4N = forward 2N + backward w.r.t. activations 2N: the frozen base gets no weight gradients; LoRA
  factors and the projector are trained, so they cost 6x (forward, activation grads, weight grads).
  Full fine-tuning would instead cost 6*N + 6*N_head per token (+ the same attention).

Greedy decode of B prompts of P tokens, G new tokens (prefill + G-1 one-token steps; the last new
token needs no forward):
  prefill  B*P*(2*N + 2*N_lora + 4*L*H*Dh*P) + B*2*N_head (logits of the last position only)
  step i   B*(2*N + 2*N_lora + 2*N_head + 4*L*H*Dh*(P + i)),  i = 1..G-1
  (+ 2*N_proj per prompt ID slot)

SASRec train step (every weight trained, B sequences of length T, h = hidden, blocks of 1 attention
+ 2-layer FFN): N_s = blocks * (4*h^2 + 2*h^2); per position 6*N_s + 12*blocks*h*T + 12*h (scoring
the positive and the negative item: 2 dot products of h, forward + both gradients).
"""
from __future__ import annotations

import dataclasses

FORMULAS = {
    "N": "L*(d*Dh*(2H+2KV) + 3*d*F): decoder-layer matmul weights (non-embedding; norms excluded)",
    "N_head": "d*V (LM head), counted only where logits are used",
    "N_lora": "L * sum_targets r*(fan_in+fan_out)",
    "N_proj": "d_rec*d + d*d (projector, at ID-slot positions only)",
    "attention": "forward 4*S*H*Dh per token per layer, forward+backward 12*S*H*Dh, S = padded length (dense)",
    "train_step": "B*T*(4N + 4N_head + 6N_lora + 12*L*H*Dh*T) + B*T_t*(4N + 6N_lora + 12*L*H*Dh*T_t) "
                  "+ slots*6*N_proj   [frozen base + LoRA; full fine-tuning would be 6N + 6N_head]",
    "decode": "B*P*(2N + 2N_lora + 4*L*H*Dh*P) + 2*B*N_head + sum_{i=1}^{G-1} B*(2N + 2N_lora + 2N_head "
              "+ 4*L*H*Dh*(P+i)) + slots*2*N_proj",
    "sasrec_step": "B*T*(6*N_s + 12*blocks*h*T + 12*h), N_s = blocks*6*h^2",
    "mfu": "model FLOPs / step time / measured matmul peak (own framework's, and the max of both)",
}


@dataclasses.dataclass(frozen=True)
class LlmCounts:
    """Parameter counts that drive the formulas (see the module docstring)."""

    n: int  # decoder-layer matmul weights
    n_head: int
    n_lora: int
    n_proj: int
    attn_width: int  # H * Dh
    layers: int


def _lora_fans(config) -> dict[str, tuple[int, int]]:
    d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    return dict(q_proj=(d, q), k_proj=(d, kv), v_proj=(d, kv), o_proj=(q, d),
                gate_proj=(d, f), up_proj=(d, f), down_proj=(f, d))


def llm_counts(config, lora_rank: int, lora_targets, rec_dim: int) -> LlmCounts:
    """`config`: rsllm_jax LlamaConfig."""
    d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
    attn = d * dh * (2 * config.num_heads + 2 * config.num_kv_heads)
    fans = _lora_fans(config)
    lora = sum(lora_rank * sum(fans[t]) for t in lora_targets) if lora_rank else 0
    return LlmCounts(
        n=config.num_layers * (attn + 3 * d * f), n_head=d * config.vocab_size, n_lora=config.num_layers * lora,
        n_proj=rec_dim * d + d * d, attn_width=config.num_heads * dh, layers=config.num_layers,
    )


def _attention(c: LlmCounts, keys: int, factor: int) -> int:
    return factor * c.layers * c.attn_width * keys


def train_step_flops(c: LlmCounts, batch: int, seq_len: int, target_len: int, slots: int) -> int:
    main = batch * seq_len * (4 * c.n + 4 * c.n_head + 6 * c.n_lora + _attention(c, seq_len, 12))
    target = batch * target_len * (4 * c.n + 6 * c.n_lora + _attention(c, target_len, 12))
    return main + target + slots * 6 * c.n_proj


def prefill_flops(c: LlmCounts, batch: int, prompt_len: int) -> int:
    """The prompt pass: every prompt token through the layers, the LM head at the last position only."""
    return batch * prompt_len * (2 * c.n + 2 * c.n_lora + _attention(c, prompt_len, 4)) + batch * 2 * c.n_head


def decode_flops(c: LlmCounts, batch: int, prompt_len: int, new_tokens: int, slots: int) -> int:
    total = prefill_flops(c, batch, prompt_len)
    for i in range(1, new_tokens):
        total += batch * (2 * c.n + 2 * c.n_lora + 2 * c.n_head + _attention(c, prompt_len + i, 4))
    return total + slots * 2 * c.n_proj


def sasrec_step_flops(hidden: int, blocks: int, max_len: int, batch: int) -> int:
    n_s = blocks * 6 * hidden * hidden
    return batch * max_len * (6 * n_s + 12 * blocks * hidden * max_len + 12 * hidden)


def matmul_flops(n: int) -> int:
    return 2 * n**3
