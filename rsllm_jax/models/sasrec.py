"""SASRec (Kang & McAuley, ICDM 2018): the conventional recommender that supplies RSLLM's ID embeddings.

Spec §2: 64-d item embedding, 1 self-attention block, 1 head, dropout 0.1, learned positions over the
10 history steps, causal mask. Items are scored by the dot product of a position's output state with
the item's row of the (shared) embedding table, so that table is what stage 2 hands to the LLM.

Item id `num_items` is the padding id (LLaRA's convention); its embedding row is kept but masked out
of attention and zeroed in the input.

Optional side table (P2Rec's information augmentation, off by default): a frozen per-item table
`side_table` [num_items + 1, side_dim] (e.g. reduced LLM item embeddings) is added to every item
vector, through a trainable Dense(hidden) when `side_proj`. The table is a parameter so it is
checkpointed with the model, but it never receives gradients (stop_gradient here; the trainer gives
it no optimizer updates).
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
    side_dim: int = 0  # >0: add a frozen side table of this width to every item vector (P2Rec)
    side_proj: bool = False  # map the side table through a trainable Dense(hidden) first

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
        if c.side_dim:
            if not c.side_proj and c.side_dim != c.hidden:
                raise ValueError(f"SASRec side table width {c.side_dim} != hidden {c.hidden}: set side_proj=True")
            # Filled in by the trainer (set_item_tables); the padding row stays zero.
            self.side_table = self.param("side_table", nn.initializers.zeros, (c.num_items + 1, c.side_dim))
            if c.side_proj:
                self.side_dense = nn.Dense(c.hidden)

    def _side(self, rows: jax.Array) -> jax.Array:
        rows = jax.lax.stop_gradient(rows)  # frozen data, not a learned table
        return self.side_dense(rows) if self.config.side_proj else rows

    def embed_items(self, items: jax.Array) -> jax.Array:
        """Item vectors [..., hidden]: the learned row (+ the side table's contribution)."""
        x = self.item_embedding(items)
        if self.config.side_dim:
            x = x + self._side(jnp.take(self.side_table, items, axis=0))
        return x

    def all_items(self) -> jax.Array:
        """Every real item's vector [num_items, hidden] (padding row excluded)."""
        n = self.config.num_items
        table = self.item_embedding.embedding[:n]
        if self.config.side_dim:
            table = table + self._side(self.side_table[:n])
        return table

    def __call__(self, seq: jax.Array, deterministic: bool = True) -> jax.Array:
        """seq [B, L] item ids (left-padded with pad_id) -> output states [B, L, hidden]."""
        c = self.config
        valid = (seq != c.pad_id).astype(jnp.float32)
        x = self.embed_items(seq) * (c.hidden**0.5)
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
        return jnp.einsum("...h,...kh->...k", states, self.embed_items(items))

    def score_all(self, states: jax.Array) -> jax.Array:
        """Logits over the whole catalogue (padding row excluded): [B, H] -> [B, num_items]."""
        return states @ self.all_items().T


def item_table(params) -> jax.Array:
    """The item-embedding table handed to stage 2 (padding row dropped): [num_items, hidden].
    With a side table this is the effective table the model scores with (learned + side)."""
    table = params["item_embedding"]["embedding"][:-1]
    if "side_table" in params:
        side = params["side_table"][:-1]
        if "side_dense" in params:
            side = side @ params["side_dense"]["kernel"] + params["side_dense"]["bias"]
        table = table + side
    return table


def set_item_tables(params, item_init=None, side_table=None):
    """Returns params with the item rows initialised from `item_init` [num_items, hidden] and/or the
    frozen side table filled from `side_table` [num_items, side_dim]; padding rows are kept (learned
    row) or zero (side row). Pure: used inside the jitted init."""
    params = dict(params)
    emb = params["item_embedding"]["embedding"]
    if item_init is not None:
        if tuple(item_init.shape) != (emb.shape[0] - 1, emb.shape[1]):
            raise ValueError(f"item_init has shape {tuple(item_init.shape)}, expected "
                             f"{(emb.shape[0] - 1, emb.shape[1])} (num_items, config.sasrec.hidden)")
        params["item_embedding"] = {"embedding": emb.at[:-1].set(jnp.asarray(item_init, emb.dtype))}
    if side_table is not None:
        if "side_table" not in params:
            raise ValueError("side_table given but the SASRec config has side_dim=0")
        side = params["side_table"]
        if tuple(side_table.shape) != (side.shape[0] - 1, side.shape[1]):
            raise ValueError(f"side_table has shape {tuple(side_table.shape)}, expected "
                             f"{(side.shape[0] - 1, side.shape[1])} (num_items, side width)")
        params["side_table"] = side.at[:-1].set(jnp.asarray(side_table, side.dtype))
    return params
