"""SASRec's pure pieces: loss, train step, evaluation scores (no I/O; jitted by the trainer)."""
import jax
import jax.numpy as jnp
import optax

from rsllm_jax.eval import ranking
from rsllm_jax.models.sasrec import SASRec


def sasrec_loss(model: SASRec, params, batch, rng, loss_type: str):
    """Next-item loss on every real position. 'bce': one sampled negative per position (LLaRA's
    recommender); 'softmax': full cross-entropy over the catalogue (ours)."""
    states = model.apply({"params": params}, batch["seq"], deterministic=False, rngs={"dropout": rng})
    mask = (batch["pos"] != model.config.pad_id).astype(jnp.float32)
    if loss_type == "bce":
        pos = model.apply({"params": params}, states, batch["pos"][..., None], method=SASRec.score)[..., 0]
        neg = model.apply({"params": params}, states, batch["neg"][..., None], method=SASRec.score)[..., 0]
        per_pos = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)
    elif loss_type == "softmax":
        logits = model.apply({"params": params}, states, method=SASRec.score_all)
        per_pos = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.minimum(batch["pos"], model.config.num_items - 1)
        )
    else:
        raise ValueError(f"config.sasrec.loss must be 'bce' or 'softmax', got {loss_type!r}")
    return jnp.sum(per_pos * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def train_step(model, tx, loss_type, state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    loss, grads = jax.value_and_grad(lambda p: sasrec_loss(model, p, batch, rng, loss_type))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(step=state["step"] + 1, params=params, opt_state=opt_state), {"loss": loss}


def eval_scores(model, params, batch):
    """Per-example HR@1 on the frozen candidates and catalogue rank (history excluded)."""
    states = model.apply({"params": params}, batch["seq"], deterministic=True)[:, -1]
    cand_scores = model.apply({"params": params}, states, batch["candidates"], method=SASRec.score)
    hit1 = ranking.candidate_hit_at_1(cand_scores, batch["candidates"], batch["target"])
    ranks = ranking.target_rank(
        model.apply({"params": params}, states, method=SASRec.score_all), batch["target"], exclude=batch["seq"]
    )
    return hit1, ranks
