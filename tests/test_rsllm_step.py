"""The RSLLM model and its one train step: slot splicing, sharded == single device, it learns."""
import functools

import jax
import numpy as np
import flax.linen as nn
import pytest

from configs import tiny
from rsllm_jax import sharding
from rsllm_jax.data.prompt_pipeline import TrainExample
from rsllm_jax.data.prompts import PromptBuilder, PromptSettings, pad_batch
from rsllm_jax.models.rsllm import RSLLM
from rsllm_jax.train import step as step_lib
from rsllm_jax.train.optimizer import make_optimizer
from rsllm_jax.train.rsllm_setup import build_rsllm
from rsllm_jax.train.rsllm_step import rsllm_loss
from tiny_llm import tiny_llm

TITLES = ["Toy Story", "Heat", "Alien", "The Matrix", "Star Wars", "Fargo", "Casablanca", "Matrix Heat",
          "Alien Story", "Star Heat", "Fargo Wars", "Toy Heat", "Casablanca Story", "Alien Wars", "Heat Story",
          "Star Story", "Toy Wars", "Fargo Story", "The Heat", "The Alien", "The Fargo", "Star Toy"]
N = len(TITLES)


def _cfg(data=1, fsdp=1, tensor=1):
    c = tiny.get_llm_config("stage2")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


def _batch(builder, n=8, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        items = rng.choice(N, 5, replace=False).tolist()
        recs.append(dict(history=items[:4], target=items[4]))
    ex = TrainExample({"d": builder}, num_items={"d": N}, num_candidates=6, seed=seed, batch_size=n,
                      use_ids=True)
    return pad_batch([ex(i, r) for i, r in enumerate(recs)], (128, 256))


def _built(cfg, mesh, llm):
    table = np.random.default_rng(1).normal(size=(N, 64)).astype(np.float32)
    return build_rsllm(cfg, mesh, num_items=N, rec_table=table, llm=llm)


def test_slot_positions_and_only_they_get_the_projected_item():
    llm = tiny_llm()
    cfg = _cfg()
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    built = _built(cfg, mesh, llm)
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    b = _batch(builder)
    x = built.model.apply({"params": built.params}, b["input_ids"], b["slot_items"], method=RSLLM.embed)
    plain = built.model.apply({"params": built.params}, np.where(b["input_ids"] >= llm[0].vocab_size, 0,
                                                                 b["input_ids"]), method=lambda m, i: m.llm.embed(i))
    slot = b["slot_items"] >= 0
    projected = built.model.apply({"params": built.params}, np.maximum(b["slot_items"], 0),
                                  method=RSLLM.item_id_embedding)
    np.testing.assert_allclose(np.asarray(x)[slot], np.asarray(projected)[slot], rtol=1e-6, atol=1e-6)
    text = ~slot & (b["input_ids"] < llm[0].vocab_size)
    np.testing.assert_array_equal(np.asarray(x)[text], np.asarray(plain)[text])
    assert slot.sum() == 8 * (4 + 6)  # every history item and candidate has exactly one slot


def _run_steps(mesh_shape, devices, llm, batch, steps=2, lr=None, trainable=None, dtype=None):
    cfg = _cfg(*mesh_shape)
    if dtype:
        cfg.llm.dtype = cfg.llm.param_dtype = dtype
    if lr:
        cfg.optim.lr = lr
    if trainable:
        cfg.trainable = trainable
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    built = _built(cfg, mesh, llm)
    (tr, fr), (tr_sh, fr_sh) = built.split()
    tx = make_optimizer(cfg.optim, max(steps, 10))
    state = step_lib.create_state(tr, fr, tx)
    repl = sharding.replicated(mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh,
                                   opt_state=jax.tree.map(lambda _: repl, state.opt_state))
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    fn = step_lib.jit_train_step(functools.partial(rsllm_loss, built.model, cfg.loss), tx,
                                 cfg.train.grad_accum_steps, state_sh, batch_sh, repl)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.device_put(state, state_sh)
        for _ in range(steps):
            state, m = fn(state, jax.device_put(batch, batch_sh), jax.random.key(0))
            losses.append({k: float(v) for k, v in m.items()})
    return losses, jax.device_get(state.trainable), state


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned-layers"])
def test_sharded_step_matches_single_device(scan):
    llm = tiny_llm(scan_layers=scan)
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    batch = _batch(builder, n=16)
    one, p1, _ = _run_steps((1, 1, 1), jax.devices()[:1], llm, batch)
    eight, p8, state8 = _run_steps((2, 2, 2), jax.devices()[:8], llm, batch)
    for a, b in zip(one, eight):
        for k in ("loss", "nip", "l_ut", "l_tt"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5), p1, p8)
    # The 8-device state really is sharded by the logical rules (not silently replicated).
    layers = state8.frozen["llm"]["layers"] if scan else state8.frozen["llm"]["layers_0"]
    spec = layers["self_attn"]["q_proj"]["kernel"].sharding.spec
    assert tuple(spec)[scan:scan + 2] == ("fsdp", "tensor")
    # LoRA leaves are trained per layer (scanned: one stacked leaf with the layer axis first).
    lora_a = p8["llm"]["layers"]["self_attn"]["q_proj"]["lora_a"] if scan else None
    if scan:
        assert lora_a.shape[0] == llm[0].num_layers


def test_bf16_compute_trains_fp32_master_weights_and_tracks_the_fp32_losses():
    llm = tiny_llm()
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    batch = _batch(builder, n=8)
    f32, p32, _ = _run_steps((1, 1, 1), jax.devices()[:1], llm, batch, steps=3, lr=1e-2)
    bf16, pbf, state = _run_steps((1, 1, 1), jax.devices()[:1], llm, batch, steps=3, lr=1e-2, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {np.dtype("float32")}  # master weights
    assert state.frozen["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jax.numpy.bfloat16
    # bf16 matmul inputs with fp32 accumulation, norms, softmax and losses: the LM loss tracks fp32 closely.
    # (L_UT / L_TT are not compared: InfoNCE at temperature tau over a random model's nearly parallel
    # representations multiplies rounding by 1/tau; on the real model the check is validation accuracy.)
    for a, b in zip(f32, bf16):
        np.testing.assert_allclose(b["nip"], a["nip"], rtol=1e-2)
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=3e-2)
    lora_b = lambda p: p["llm"]["layers_0"]["self_attn"]["q_proj"]["lora_b"]  # noqa: E731
    assert np.abs(lora_b(pbf)).max() > 0  # the updates landed on the fp32 master weights


def test_tiny_model_overfits_a_batch():
    # Full fine-tuning of a random 32-wide model: proves the fused step drives every loss term down.
    llm = tiny_llm()
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    batch = _batch(builder, n=8)
    losses, _, _ = _run_steps((1, 1, 1), jax.devices()[:1], llm, batch, steps=30, lr=1e-2,
                              trainable=(r"llm/.*", r"projector/.*", r"added_embeddings/.*"))
    assert losses[-1]["nip"] < 0.5 * losses[0]["nip"]
    assert losses[-1]["loss"] < losses[0]["loss"]


def test_title_representation_is_a_title_only_pass_and_alignment_is_reported():
    llm = tiny_llm()
    cfg = _cfg()
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    built = _built(cfg, mesh, llm)
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256), use_marker=True))
    b = _batch(builder)
    out = built.model.apply({"params": built.params}, b, method=RSLLM.towers)
    # A separate pass over the bare titles (no marker, no slot) gives the same pooled vector.
    bare = [builder.render_target(int(i), use_ids=False) for i in b["target_item"]]
    ids = np.stack([e["target_input_ids"] for e in bare])
    mask = np.stack([e["target_attention_mask"] for e in bare])
    _, hidden = built.model.apply({"params": built.params}, ids, mask)
    from rsllm_jax import losses
    np.testing.assert_allclose(np.asarray(out["v_title"]), np.asarray(losses.masked_mean_pool(hidden, mask)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out["v_title"]), np.asarray(out["v_target"]), atol=1e-4)
    cfg.loss.align_weight = 0.1
    total, metrics = rsllm_loss(built.model, cfg.loss, built.params, {}, b, jax.random.key(0))
    assert np.isfinite(float(metrics["l_align"])) and float(metrics["l_align"]) > 0


def test_logits_at_answer_positions_only_give_the_same_loss_and_gradients():
    llm = tiny_llm()
    cfg = _cfg()
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    built = _built(cfg, mesh, llm)
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    b = _batch(builder)
    (tr, fr), _ = built.split()

    def grads(positions):
        cfg.loss.logit_positions = positions
        fn = lambda t: rsllm_loss(built.model, cfg.loss, t, fr, b, jax.random.key(0))  # noqa: E731
        return jax.value_and_grad(fn, has_aux=True)(tr)

    (full, m_full), g_full = grads(0)
    (some, m_some), g_some = grads(16)
    np.testing.assert_allclose(float(some), float(full), rtol=1e-6)
    assert float(m_some["answer_tokens_dropped"]) == 0
    jax.tree.map(lambda a, c: np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7), g_full, g_some)
    # A cap below the answer length drops tokens, and says so.
    (_, m_cut), _ = grads(1)
    assert float(m_cut["answer_tokens_dropped"]) == float(m_full["answer_tokens"]) - 8


def _step_grads(llm, batch, accum, pool, mesh_shape=(1, 1, 1), nip_weight=0.0):
    """The gradient one train step applies (SGD at rate 1 without clipping: delta = -grad) and its metrics."""
    import optax

    from rsllm_jax.train.rsllm_step import rsllm_objective
    cfg = _cfg(*mesh_shape)
    cfg.train.grad_accum_steps = accum
    cfg.loss.nce_pool = pool
    cfg.loss.weight_tt = cfg.loss.weight_ut = (1.0 - nip_weight) / 2
    n_dev = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_dev])
    rules = sharding.rules_from_config(cfg.mesh.rules)
    built = _built(cfg, mesh, llm)
    (tr, fr), (tr_sh, fr_sh) = built.split()
    tx = optax.sgd(1.0)
    state = step_lib.create_state(tr, fr, tx)
    repl = sharding.replicated(mesh)
    state_sh = step_lib.TrainState(step=repl, trainable=tr_sh, frozen=fr_sh,
                                   opt_state=jax.tree.map(lambda _: repl, state.opt_state))
    batch_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    fn = step_lib.jit_train_step(rsllm_objective(built.model, cfg.loss), tx, accum, state_sh, batch_sh, repl)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        before = jax.device_get(state.trainable)
        new, m = fn(jax.device_put(state, state_sh), jax.device_put(batch, batch_sh), jax.random.key(0))
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), before, jax.device_get(new.trainable))
    return grads, {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)], ids=["1-device", "8-devices"])
def test_step_pool_gives_the_gradient_of_one_unaccumulated_batch(mesh_shape):
    # InfoNCE only (NIP weight 0): its negatives are the whole batch of 16 with nce_pool="step", so 4
    # accumulated micro-batches of 4 must give the loss and gradient of one batch of 16.
    llm = tiny_llm()
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    batch = _batch(builder, n=16, seed=3)
    whole, m_whole = _step_grads(llm, batch, 1, "micro_batch")
    pooled, m_pooled = _step_grads(llm, batch, 4, "step", mesh_shape)
    micro, m_micro = _step_grads(llm, batch, 4, "micro_batch")
    for k in ("l_ut", "l_tt", "loss"):
        np.testing.assert_allclose(m_pooled[k], m_whole[k], rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-6), whole, pooled)
    # Negatives from one micro-batch are a different loss with a different gradient (what the pool fixes).
    assert m_micro["l_ut"] < m_whole["l_ut"] - 0.1
    delta = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(micro)))
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(whole))
    assert delta > 0.05 * scale


def test_step_pool_keeps_nip_per_micro_batch_and_rejects_an_unknown_pool():
    llm = tiny_llm()
    builder = PromptBuilder(llm[2], TITLES, llm[0].vocab_size, PromptSettings(buckets=(128, 256)))
    batch = _batch(builder, n=8, seed=4)
    # All weight on NIP: the pool changes nothing, so "step" and "micro_batch" take the same step.
    g_step, m_step = _step_grads(llm, batch, 2, "step", nip_weight=1.0)
    g_micro, m_micro = _step_grads(llm, batch, 2, "micro_batch", nip_weight=1.0)
    for k in ("nip", "loss", "answer_tokens"):
        np.testing.assert_allclose(m_step[k], m_micro[k], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-7), g_micro, g_step)
    from rsllm_jax.train.rsllm_step import rsllm_objective
    cfg = _cfg()
    cfg.loss.nce_pool = "global"
    with pytest.raises(ValueError, match=r"config.loss.nce_pool='global'.*micro_batch, step"):
        rsllm_objective(None, cfg.loss)


def test_mixed_matmul_gradients_match_the_fp32_dot():
    import jax.numpy as jnp

    from rsllm_jax.models.lora import mixed_matmul

    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((6, 16), (16, 12), (6, 12)))

    def loss(f, dtype):
        return lambda x, w: jnp.sum(f(x.astype(dtype), w.astype(dtype)).astype(jnp.float32) * g)

    want = jax.grad(loss(jnp.dot, jnp.float32), argnums=(0, 1))(x, w)
    got = jax.grad(loss(mixed_matmul, jnp.bfloat16), argnums=(0, 1))(x, w)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(b, np.float32), a, rtol=3e-2, atol=3e-2 * np.abs(a).max())
    y = mixed_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), x @ w, rtol=3e-2, atol=3e-2 * np.abs(x @ w).max())
