"""The fused RSLLM objective (spec §4): NIP + L_TT + L_UT (+ optional ID-text alignment) in one pass.

`rsllm_loss` is the `loss_fn` handed to train/step.py; stage 1 uses it unchanged on text-only
batches (no slot positions, so the projector is never touched). It is built from two halves, so the
same definition also serves a step-wide InfoNCE pool (`config.loss.nce_pool = "step"`):
  rsllm_local:  one micro-batch's forward pass -> (1 - a - b) * NIP and the pooled tower vectors;
  rsllm_pooled: the InfoNCE terms over whatever rows it is given (one micro-batch, or every
                micro-batch of the step through train/step.py's PooledLoss).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rsllm_jax import losses
from rsllm_jax.models.lora import merge_trees
from rsllm_jax.models.rsllm import RSLLM
from rsllm_jax.train.nce_pool import nce_pool_name
from rsllm_jax.train.step import PooledLoss


def rsllm_local(model: RSLLM, loss_cfg, trainable, frozen, batch, rng):
    """-> ((1 - a - b) * NIP, tower vectors {v_user, v_target_given_user, v_target[, v_id, v_title]}, metrics)."""
    params = merge_trees(trainable, frozen)
    positions = int(getattr(loss_cfg, "logit_positions", 0) or 0)
    out = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng}, method=RSLLM.towers,
                      loss_positions=positions)
    if positions:  # logits exist only at the (gathered) answer positions
        nip, n_tokens = losses.nip_loss(out["logits"], out["labels"], out["loss_mask"])
    else:
        nip, n_tokens = losses.nip_loss(out["logits"], batch["labels"], batch["loss_mask"])
    metrics = dict(nip=nip, answer_tokens=n_tokens)
    if positions:  # answer tokens past the cap get no NIP loss: visible, never silent
        metrics["answer_tokens_dropped"] = out["loss_tokens_dropped"]
    reps = {k: out[k] for k in ("v_user", "v_target_given_user", "v_target")}
    if loss_cfg.align_weight and model.config.num_items:
        # ID-text alignment (ours): the projected ID of the target vs the LLM's title-only representation
        # (v_title excludes the slot; v_target would contain the projected ID itself).
        reps["v_id"] = model.apply({"params": params}, batch["target_item"], method=RSLLM.item_id_embedding)
        reps["v_title"] = out["v_title"]
    local = (1.0 - loss_cfg.weight_tt - loss_cfg.weight_ut) * nip
    distill_weight = float(getattr(loss_cfg, "weight_distill", 0.0) or 0.0)
    if distill_weight:
        metrics["distill"] = d = distill_loss(model, loss_cfg, params, out, batch, positions)
        local = local + distill_weight * d
    listwise_weight = float(getattr(loss_cfg, "weight_listwise", 0.0) or 0.0)
    if listwise_weight:
        lw, metrics["listwise_top1"] = losses.listwise_softmax(
            out["candidate_scores"], temperature=loss_cfg.listwise_temperature,
            candidate_valid=batch["lw_valid"], valid=batch.get("valid"))
        metrics["listwise"] = lw
        local = local + listwise_weight * lw
    return local, reps, metrics


def listwise_packing(loss_cfg) -> tuple[int, int] | None:
    """(negatives, answer tokens) the training examples pack for the listwise loss, None when it is off."""
    if not float(getattr(loss_cfg, "weight_listwise", 0.0) or 0.0):
        return None
    n, a = int(loss_cfg.listwise_negatives), int(loss_cfg.listwise_answer_tokens)
    if n < 1 or a < 1:
        raise ValueError(f"config.loss.weight_listwise > 0 needs listwise_negatives >= 1 and listwise_answer_tokens "
                         f">= 1, got {n} and {a}")
    return n, a


def distill_loss(model: RSLLM, loss_cfg, params, out, batch, positions: int):
    """SASRec's softmax over the window's candidates -> the LM's first answer token (losses.candidate_distill)."""
    if positions:  # the gathered logits start at the first answer position
        first = out["logits"][:, 0]
    else:
        at = jnp.argmax(batch["loss_mask"], axis=1)
        first = jnp.take_along_axis(out["logits"], at[:, None, None], axis=1)[:, 0]
    teacher = model.apply({"params": params}, batch["user_state"], batch["cand_items"], method=RSLLM.sasrec_scores)
    return losses.candidate_distill(first, batch["cand_first_token"], teacher,
                                    temperature=loss_cfg.distill_temperature, valid=batch.get("valid"))


def rsllm_pooled(loss_cfg, reps, batch):
    """-> (a * L_TT + b * L_UT (+ c * L_align), metrics): InfoNCE with the given rows as each other's negatives."""
    nce = dict(temperature=loss_cfg.temperature, item_ids=batch["target_item"], valid=batch.get("valid"))
    l_ut = losses.info_nce(reps["v_user"], reps["v_target"], **nce)
    l_tt = losses.info_nce(reps["v_target_given_user"], reps["v_target"], **nce)
    metrics = dict(l_ut=l_ut, l_tt=l_tt)
    total = loss_cfg.weight_tt * l_tt + loss_cfg.weight_ut * l_ut
    if "v_id" in reps:
        metrics["l_align"] = align = losses.info_nce(reps["v_id"], reps["v_title"], **nce)
        total = total + loss_cfg.align_weight * align
    return total, metrics


def rsllm_loss(model: RSLLM, loss_cfg, trainable, frozen, batch, rng):
    """The whole loss of one micro-batch, InfoNCE negatives from that micro-batch (spec §4)."""
    _, reps, metrics = rsllm_local(model, loss_cfg, trainable, frozen, batch, rng)
    _, nce = rsllm_pooled(loss_cfg, reps, batch)
    # The same sum as local + pooled, in the order earlier runs used (bit-for-bit the same updates).
    total = losses.combine(metrics["nip"], nce["l_tt"], nce["l_ut"], loss_cfg.weight_tt, loss_cfg.weight_ut,
                           nce.get("l_align"), loss_cfg.align_weight)
    if "distill" in metrics:
        total = total + loss_cfg.weight_distill * metrics["distill"]
    if "listwise" in metrics:
        total = total + loss_cfg.weight_listwise * metrics["listwise"]
    metrics = dict(metrics, **nce, loss=total)
    return total, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def rsllm_objective(model: RSLLM, loss_cfg):
    """What train/step.py differentiates: `rsllm_loss` (negatives from one micro-batch) or, with
    loss_cfg.nce_pool == "step", the PooledLoss whose negatives are every row of the step's batch."""
    if nce_pool_name(loss_cfg) == "step":
        return PooledLoss(local=functools.partial(rsllm_local, model, loss_cfg),
                          pooled=functools.partial(rsllm_pooled, loss_cfg))
    return functools.partial(rsllm_loss, model, loss_cfg)
