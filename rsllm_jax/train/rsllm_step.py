"""The fused RSLLM objective (spec §4): NIP + L_TT + L_UT (+ optional ID-text alignment) in one pass.

`rsllm_loss` is the `loss_fn` handed to train/step.py; stage 1 uses it unchanged on text-only
batches (no slot positions, so the projector is never touched).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rsllm_jax import losses
from rsllm_jax.models.lora import merge_trees
from rsllm_jax.models.rsllm import RSLLM


def rsllm_loss(model: RSLLM, loss_cfg, trainable, frozen, batch, rng):
    params = merge_trees(trainable, frozen)
    positions = int(getattr(loss_cfg, "logit_positions", 0) or 0)
    out = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng}, method=RSLLM.towers,
                      loss_positions=positions)
    if positions:  # logits exist only at the (gathered) answer positions
        nip, n_tokens = losses.nip_loss(out["logits"], out["labels"], out["loss_mask"])
    else:
        nip, n_tokens = losses.nip_loss(out["logits"], batch["labels"], batch["loss_mask"])
    nce = dict(temperature=loss_cfg.temperature, item_ids=batch["target_item"], valid=batch.get("valid"))
    l_ut = losses.info_nce(out["v_user"], out["v_target"], **nce)
    l_tt = losses.info_nce(out["v_target_given_user"], out["v_target"], **nce)
    metrics = dict(nip=nip, l_ut=l_ut, l_tt=l_tt, answer_tokens=n_tokens)
    if positions:  # answer tokens past the cap get no NIP loss: visible, never silent
        metrics["answer_tokens_dropped"] = out["loss_tokens_dropped"]
    align = None
    if loss_cfg.align_weight and model.config.num_items:
        # ID-text alignment (ours): the projected ID of the target vs the LLM's title-only representation
        # (v_title excludes the slot; v_target would contain the projected ID itself).
        id_vec = model.apply({"params": params}, batch["target_item"], method=RSLLM.item_id_embedding)
        align = losses.info_nce(id_vec, out["v_title"], **nce)
        metrics["l_align"] = align
    total = losses.combine(nip, l_tt, l_ut, loss_cfg.weight_tt, loss_cfg.weight_ut, align, loss_cfg.align_weight)
    metrics["loss"] = total
    return total, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
