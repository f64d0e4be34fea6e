"""RSLLM: the LLM reading hybrid (title + ID) prompts, plus the pooled tower vectors (spec §3-4).

Parameter tree (paths the config's trainable regexes select from):
  llm/...                 the pretrained LLaMA (frozen) incl. its LoRA leaves (trainable)
  added_embeddings/embedding   rows for tokens added to the tokenizer ([IID], optional marker)
  projector/...           Dense-GELU-Dense from the SASRec space to the LLM's (trainable, stage 2)
  rec/item_table          the frozen SASRec item embeddings [num_items, d_rec]

Hybrid encoding: input ids >= the base vocabulary read the added rows; at every position whose
`slot_items` >= 0 the embedding is replaced by projector(item_table[item]). Shapes stay static: the
collator emits per-position slot item ids and this module does a `where`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsllm_jax import losses
from rsllm_jax.models.llama import Llama, LlamaConfig
from rsllm_jax.models.lora import LoraConfig
from rsllm_jax.models.projector import Projector


@dataclasses.dataclass(frozen=True)
class RSLLMConfig:
    llm: LlamaConfig
    num_added_tokens: int  # ids [llm.vocab_size, llm.vocab_size + n) are ours
    num_items: int = 0  # 0 -> no ID tower (stage 1, text-only)
    rec_dim: int = 64
    user_slot: bool = False  # a second projector for SASRec's user state (prompts' user slot)


class RSLLM(nn.Module):
    config: RSLLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    def setup(self):
        c = self.config
        self.llm = Llama(c.llm, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        self.added_embeddings = nn.Embed(
            max(c.num_added_tokens, 1), c.llm.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        )
        if c.num_items:
            self.projector = Projector(c.llm.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)
            self.rec = ItemTable(c.num_items, c.rec_dim, param_dtype=self.param_dtype)
            if c.user_slot:
                self.user_projector = Projector(c.llm.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids: jax.Array, slot_items: jax.Array | None = None,
              user_slot: jax.Array | None = None, user_state: jax.Array | None = None) -> jax.Array:
        """Hybrid input embeddings [B, T, D]: LLM table, added-token rows, projected item IDs, and (with
        `config.user_slot`) user_projector(user_state [B, rec_dim]) wherever `user_slot` [B, T] is 1."""
        c = self.config
        vocab = c.llm.vocab_size
        is_added = input_ids >= vocab
        x = self.llm.embed(jnp.where(is_added, 0, input_ids))
        # Ids past the stored rows (the user slot's) are always overwritten below.
        added = self.added_embeddings(jnp.clip(input_ids - vocab, 0, max(c.num_added_tokens, 1) - 1))
        x = jnp.where(is_added[..., None], added.astype(x.dtype), x)
        if slot_items is not None and c.num_items:
            is_slot = slot_items >= 0
            projected = self.projector(self.rec(jnp.where(is_slot, slot_items, 0)))
            x = jnp.where(is_slot[..., None], projected.astype(x.dtype), x)
        if c.num_items and c.user_slot:
            # Called even without a user state, so `init` creates the projector's parameters.
            state = user_state if user_state is not None else jnp.zeros((x.shape[0], c.rec_dim), jnp.float32)
            user = self.user_projector(state)[:, None, :].astype(x.dtype)
            if user_slot is not None:
                x = jnp.where(user_slot[..., None] > 0, user, x)
        return x

    def __call__(self, input_ids, attention_mask, slot_items=None, *, user_slot=None, user_state=None,
                 positions=None, segment_ids=None, deterministic: bool = True, compute_logits: bool = True):
        """-> (logits [B,T,V] fp32 (None with compute_logits=False), last-layer hidden states [B,T,D]).
        `positions` / `segment_ids` [B, T]: packed rows (Llama's), e.g. candidate answers after a prompt."""
        x = self.embed(input_ids, slot_items, user_slot, user_state)
        return self.llm(inputs_embeds=x, attention_mask=attention_mask, positions=positions,
                        segment_ids=segment_ids, deterministic=deterministic, return_hidden=True,
                        compute_logits=compute_logits)

    def towers(self, batch, *, deterministic: bool = True, loss_positions: int = 0) -> dict[str, jax.Array]:
        """Main pass + second pass (target alone): logits and the pooled v_U, v_T|U, v_T.

        `loss_positions` > 0: logits only at the first that many positions of `loss_mask` per row
        (the answer tokens NIP scores), returned with their `labels`/`loss_mask` gathered alike and the
        count of loss tokens beyond the cap. The LM head over every prompt position is the step's
        largest matmul and all but ~5 % of it would be thrown away."""
        slots = batch.get("slot_items")
        logits, hidden = self(batch["input_ids"], batch["attention_mask"], slots, user_slot=batch.get("user_slot"),
                              user_state=batch.get("user_state"), positions=batch.get("positions"),
                              segment_ids=batch.get("segment_ids"), deterministic=deterministic,
                              compute_logits=not loss_positions)
        out = {}
        if "lw_pred" in batch:  # candidate answers packed after the target's (data.prompts.pack_answers)
            out["candidate_scores"] = self.candidate_scores(hidden, batch)
        if loss_positions:
            mask = batch["loss_mask"].astype(jnp.int32)
            # Stable sort on "not a loss token": the loss positions first, in order.
            pos = jnp.argsort(1 - mask, axis=1, stable=True)[:, :loss_positions]
            gathered = jnp.take_along_axis(hidden, pos[..., None], axis=1)
            logits = self.llm.head(gathered)
            out["loss_mask"] = jnp.take_along_axis(mask, pos, axis=1)
            out["labels"] = jnp.take_along_axis(batch["labels"], pos, axis=1)
            out["loss_tokens_dropped"] = jnp.sum(mask) - jnp.sum(out["loss_mask"])
        _, t_hidden = self(batch["target_input_ids"], batch["target_attention_mask"],
                           batch.get("target_slot_items"), deterministic=deterministic, compute_logits=False)
        # The title-only representation for the ID-text alignment: the ID slot (and marker) come after
        # the title, so under causal attention the title tokens' states are exactly a title-only pass.
        title_mask = batch["target_attention_mask"] * (batch["target_input_ids"] < self.config.llm.vocab_size)
        return dict(
            out,
            logits=logits,
            v_user=losses.masked_mean_pool(hidden, batch["history_mask"]),
            v_target_given_user=losses.masked_mean_pool(hidden, batch["answer_mask"]),
            v_target=losses.masked_mean_pool(t_hidden, batch["target_attention_mask"]),
            v_title=losses.masked_mean_pool(t_hidden, title_mask),
        )

    def candidate_scores(self, hidden: jax.Array, batch) -> jax.Array:
        """Each packed candidate's mean per-token log-likelihood as the answer, [B, 1 + N] (target first):
        the likelihood readout of evaluation, computed in the training pass."""
        pred, label, mask = batch["lw_pred"], batch["lw_label"], batch["lw_mask"].astype(jnp.float32)
        b, k, a = pred.shape
        states = jnp.take_along_axis(hidden, pred.reshape(b, k * a, 1), axis=1)
        logp = jax.nn.log_softmax(self.llm.head(states).astype(jnp.float32), axis=-1)
        token = jnp.take_along_axis(logp, label.reshape(b, k * a, 1), axis=-1).reshape(b, k, a)
        return jnp.sum(token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)

    def sasrec_scores(self, user_state: jax.Array, items: jax.Array) -> jax.Array:
        """SASRec's logits user_state [B, d] . item_table[items [B, K]] -> [B, K] (the distillation teacher)."""
        return jnp.einsum("bd,bkd->bk", user_state.astype(jnp.float32), self.rec(items).astype(jnp.float32))

    def item_id_embedding(self, items: jax.Array) -> jax.Array:
        """projector(item_table[items]) — the ID side of the optional ID-text alignment loss."""
        return self.projector(self.rec(items))


class ItemTable(nn.Module):
    """The frozen SASRec table as a parameter, so it is loaded, sharded and checkpointed like the rest."""

    num_items: int
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, items: jax.Array) -> jax.Array:
        table = self.param(
            "item_table", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("items", None)),
            (self.num_items, self.dim), self.param_dtype,
        )
        return jnp.take(table, items, axis=0)
