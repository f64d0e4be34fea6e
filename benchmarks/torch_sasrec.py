"""A plain PyTorch SASRec of the same size and structure as rsllm_jax/models/sasrec.py.

Pre-LN block with normalised queries and raw keys/values (the SASRec reference code), one
`nn.MultiheadAttention`, a ReLU feed-forward, learned positions, left padding with id `num_items`,
and LLaRA's BCE loss with one sampled negative per real position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden),
                                 nn.Dropout(dropout))

    def forward(self, x, blocked, valid):
        q = self.attn_norm(x)
        h, _ = self.attn(q, x, x, attn_mask=blocked, need_weights=False)
        x = self.ffn_norm(q + h)
        return (x + self.ffn(x)) * valid[..., None]


class TorchSASRec(nn.Module):
    def __init__(self, num_items: int, max_len: int = 10, hidden: int = 64, blocks: int = 1, heads: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.num_items, self.hidden, self.heads = num_items, hidden, heads
        self.item_embedding = nn.Embedding(num_items + 1, hidden)
        nn.init.normal_(self.item_embedding.weight, std=hidden**-0.5)
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        valid = (seq != self.num_items).float()
        t = seq.shape[1]
        x = self.item_embedding(seq) * self.hidden**0.5 + self.position_embedding(torch.arange(t))[None]
        x = self.dropout(x) * valid[..., None]
        # Causal, padding keys masked; a padding query still sees itself so its softmax stays finite.
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = causal[None] & ((seq != self.num_items)[:, None, :] | torch.eye(t, dtype=torch.bool)[None])
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)  # [B * heads, T, T], True = masked
        for block in self.blocks:
            x = block(x, blocked, valid)
        return self.final_norm(x)

    def bce_loss(self, seq, pos, neg) -> torch.Tensor:
        states = self(seq)
        pos_logit = (states * self.item_embedding(pos)).sum(-1)
        neg_logit = (states * self.item_embedding(neg)).sum(-1)
        mask = (pos != self.num_items).float()
        per_pos = -F.logsigmoid(pos_logit) - F.logsigmoid(-neg_logit)
        return (per_pos * mask).sum() / mask.sum().clamp(min=1.0)
