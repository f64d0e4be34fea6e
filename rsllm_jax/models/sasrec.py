"""SASRec (Kang & McAuley, ICDM 2018): the conventional recommender that supplies RSLLM's ID embeddings.

Spec §2: 64-d item embedding, 1 self-attention block, 1 head, dropout 0.1, learned positions over the
10 history steps, causal mask. Items are scored by the dot product of a position's output state with
the item's row of the (shared) embedding table, so that table is what stage 2 hands to the LLM.

Item id `num_items` is the padding id (LLaRA's convention); its embedding row is kept but masked out
of attention and zeroed in the input.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    num_items: int
    max_len: int = 10
    hidden: int = 64
    num_blocks: int = 1
    num_heads: int = 1
    dropout: float = 0.1

    @property
    def pad_id(self) -> int:
        return self.num_items


class _Block(nn.Module):
    """Pre-LN causal self-attention + point-wise feed-forward, as in the SASRec reference code."""

    config: SASRecConfig

    @nn.compact
    def __call__(self, x, attn_mask, valid, deterministic: bool):
        c = self.config
        q = nn.LayerNorm(epsilon=1e-8, name="attn_norm")(x)
        # Queries are normalised, keys/values are not: the original SASRec does this and it trains better.
        h = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, qkv_features=c.hidden, dropout_rate=c.dropout, name="attn"
        )(q, x, mask=attn_mask, deterministic=deterministic)
        x = q + h
        x = nn.LayerNorm(epsilon=1e-8, name="ffn_norm")(x)
        y = nn.Dense(c.hidden, name="ffn_in")(x)
        y = nn.Dropout(c.dropout)(nn.relu(y), deterministic=deterministic)
        y = nn.Dense(c.hidden, name="ffn_out")(y)
        y = nn.Dropout(c.dropout)(y, deterministic=deterministic)
        # The reference adds the residual to the normalised input here too.
        return (x + y) * valid[..., None]


class SASRec(nn.Module):
    config: SASRecConfig

    def setup(self):
        c = self.config
        # +1 row for the padding id.
        self.item_embedding = nn.Embed(
            c.num_items + 1, c.hidden, embedding_init=nn.initializers.normal(stddev=c.hidden**-0.5)
        )
        self.position_embedding = nn.Embed(c.max_len, c.hidden)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = [_Block(c, name=f"block_{i}") for i in range(c.num_blocks)]
        self.final_norm = nn.LayerNorm(epsilon=1e-8)

    def __call__(self, seq: jax.Array, deterministic: bool = True) -> jax.Array:
        """seq [B, L] item ids (left-padded with pad_id) -> output states [B, L, hidden]."""
        c = self.config
        valid = (seq != c.pad_id).astype(jnp.float32)
        x = self.item_embedding(seq) * (c.hidden**0.5)
        x = x + self.position_embedding(jnp.arange(seq.shape[1])[None, :])
        x = self.dropout(x, deterministic=deterministic) * valid[..., None]
        causal = nn.make_causal_mask(seq)
        # Padding keys are masked; a padding query still attends to itself so softmax stays finite.
        key_ok = nn.make_attention_mask(jnp.ones_like(seq), seq != c.pad_id)
        self_ok = jnp.eye(seq.shape[1], dtype=bool)[None, None]
        attn_mask = causal.astype(bool) & (key_ok.astype(bool) | self_ok)
        for block in self.blocks:
            x = block(x, attn_mask, valid, deterministic)
        return self.final_norm(x)

    def score(self, states: jax.Array, items: jax.Array) -> jax.Array:
        """Dot-product logits of states [..., H] against items [..., K] -> [..., K]."""
        return jnp.einsum("...h,...kh->...k", states, self.item_embedding(items))

    def score_all(self, states: jax.Array) -> jax.Array:
        """Logits over the whole catalogue (padding row excluded): [B, H] -> [B, num_items]."""
        return states @ self.item_embedding.embedding[: self.config.num_items].T


def item_table(params) -> jax.Array:
    """The item-embedding table handed to stage 2 (padding row dropped): [num_items, hidden]."""
    return params["item_embedding"]["embedding"][:-1]
