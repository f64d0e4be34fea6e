"""Pieces both P2Rec stages share: text prompts of titles, run-directory lookup, checkpoint restore,
and the batched pooled LLM forward."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from rsllm_jax import losses, sharding
from rsllm_jax.models.sasrec import SASRecConfig

POOLS = ("mean", "titles", "last")
LORA_REGEX = r"llm/.*lora_(a|b)"


# ---------------------------------------------------------------- prompts
def split_template(template: str, field: str, name: str) -> tuple[str, str]:
    """'text {field} text' -> (before, after). `name` is the config field, for the error."""
    before, sep, after = template.partition("{" + field + "}")
    if not sep or "{" in before + after or "}" in before + after:
        raise ValueError(f"config.p2rec.{name} must contain exactly one {{{field}}} and no other braces, "
                         f"got {template!r}")
    return before, after


class TitlePrompts:
    """Item lists -> token ids with the pooling mask. Each title is tokenized with its leading
    separator (as it appears in the finished string) and cut to `max_title_tokens`."""

    def __init__(self, tokenizer, titles: Sequence[str], template: str, field: str, *, name: str,
                 max_title_tokens: int, pool: str, separator: str = ", "):
        if pool not in POOLS:
            raise ValueError(f"config.p2rec.pool must be one of {POOLS}, got {pool!r}")
        if max_title_tokens < 1:
            raise ValueError(f"config.p2rec.max_title_tokens must be >= 1, got {max_title_tokens}")
        self.tok, self.titles, self.pool = tokenizer, list(titles), pool
        self.max_title_tokens, self.separator = max_title_tokens, separator
        before, self.after = split_template(template, field, name)
        # The list's first title carries the space that ends `before` ("...first: Heat").
        self.lead = " " if before.endswith(" ") else ""
        self.before = before[:-1] if self.lead else before
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [] if bos is None else [int(bos)]
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []
        return self._cache[text]

    def encode(self, items: Sequence[int]) -> tuple[list[int], list[int]]:
        """(token ids, 1 on title tokens) for one prompt."""
        ids = self.bos + self._encode(self.before)
        is_title = [0] * len(ids)
        for i, item in enumerate(items):
            piece = self._encode((self.lead if i == 0 else self.separator) + self.titles[item])[: self.max_title_tokens]
            ids, is_title = ids + piece, is_title + [1] * len(piece)
        tail = self._encode(self.after)
        return ids + tail, is_title + [0] * len(tail)

    def batch(self, item_lists: Sequence[Sequence[int]], multiple: int = 8) -> dict[str, np.ndarray]:
        """Right-padded arrays [n, L] (L = longest prompt rounded up to `multiple`: one compiled shape):
        input_ids, attention_mask, pool_mask (the positions the representation averages)."""
        if not item_lists:
            raise ValueError("no prompts to encode (empty user or item list)")
        encoded = [self.encode(items) for items in item_lists]
        length = -(-max(len(ids) for ids, _ in encoded) // multiple) * multiple
        n = len(encoded)
        out = {k: np.zeros((n, length), np.int32) for k in ("input_ids", "attention_mask", "pool_mask")}
        for r, (ids, is_title) in enumerate(encoded):
            out["input_ids"][r, : len(ids)] = ids
            out["attention_mask"][r, : len(ids)] = 1
            if self.pool == "mean":
                out["pool_mask"][r, : len(ids)] = 1
            elif self.pool == "titles":
                out["pool_mask"][r, : len(ids)] = is_title
            else:  # last: the final prompt token has read the whole prompt
                out["pool_mask"][r, len(ids) - 1] = 1
        return out


# ---------------------------------------------------------------- run directories and checkpoints
def sasrec_config_from_params(params) -> SASRecConfig:
    """The SASRec architecture a parameter tree was trained with (dropout is irrelevant at inference)."""
    emb = params["item_embedding"]["embedding"]
    blocks = sorted(k for k in params if k.startswith("block_"))
    if not blocks:
        raise ValueError(f"not a SASRec parameter tree (top-level keys: {sorted(params)})")
    query = params[blocks[0]]["attn"]["query"]["kernel"]  # [hidden, heads, head_dim]
    side = params.get("side_table")
    return SASRecConfig(num_items=emb.shape[0] - 1, max_len=params["position_embedding"]["embedding"].shape[0],
                        hidden=emb.shape[1], num_blocks=len(blocks), num_heads=query.shape[1], dropout=0.0,
                        side_dim=0 if side is None else side.shape[1], side_proj="side_dense" in params)


# ---------------------------------------------------------------- the LLM forward
def pooled_states(model, params, input_ids, attention_mask, pool_mask, *, deterministic=True, rng=None):
    """Masked mean of the last hidden states (fp32) [B, D]; `model` is an RSLLM read without ID slots.
    `rng` feeds LoRA dropout when not `deterministic` (training)."""
    _, hidden = model.apply({"params": params}, input_ids, attention_mask, deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": rng})
    return losses.masked_mean_pool(hidden, pool_mask)


def run_batched(fn: Callable, arrays: dict[str, np.ndarray], batch_size: int, mesh, desc: str = "") -> np.ndarray:
    """fn(**batch) over every row in static-size batches (the last one padded by repeating a row);
    every process holds all rows (host_to_global), the result comes back whole on every process."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        batch = {k: sharding.host_to_global(v[idx], mesh) for k, v in arrays.items()}
        out.append(sharding.to_host(fn(**batch))[: min(batch_size, n - start)])
        if desc and (start // batch_size) % 20 == 0:
            logging.info("%s: %d / %d", desc, min(start + batch_size, n), n)
    return np.concatenate(out).astype(np.float32)
