"""Logit parity with transformers' LlamaForCausalLM on random tiny checkpoints, plus the real SmolLM2 GGUF."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsllm_jax.checkpoint import hf as hf_ckpt
from rsllm_jax.models.llama import Llama, LlamaConfig, rope_inv_freq, stack_layers, unstack_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# torch's OpenMP spin-waiting collapses when the 2-core CI box is shared with XLA's threads.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
)
ROPE_LLAMA3 = dict(
    rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def make_tiny_hf(tmp_path, seed: int = 0, **overrides):
    """A random tiny LlamaForCausalLM saved as safetensors; returns (directory, torch model)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Random init leaves norms at 1; perturb them so a mis-mapped norm is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"hf_{seed}"
    model.save_pretrained(out)
    return out, model


def ragged_batch(rng: np.random.Generator, vocab: int, lengths: list[int], left: bool):
    t = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), t)).astype(np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        if left:
            mask[b, t - n:] = 1
        else:
            mask[b, :n] = 1
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnames=("model", "deterministic"))
def _jit_apply(model: Llama, params, ids, mask, dropout_rng=None, deterministic: bool = True):
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply({"params": params}, ids, attention_mask=mask, deterministic=deterministic, rngs=rngs)


def jax_logits(model: Llama, params, ids: np.ndarray, mask: np.ndarray | None = None, **kw) -> np.ndarray:
    """Jitted forward (equal modules share one compiled program: far faster than eager Flax on 2 cores)."""
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_jit_apply(model, params, ids, mask, **kw))


def max_masked_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize(
    "overrides,scan",
    [
        (dict(tie_word_embeddings=False), False),
        (dict(tie_word_embeddings=False), True),
        (dict(tie_word_embeddings=True), False),
        (dict(tie_word_embeddings=True, rope_parameters=ROPE_LLAMA3), True),
        (dict(tie_word_embeddings=False, rope_parameters=ROPE_LLAMA3), False),
        (dict(rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=2.0)), False),
        (dict(num_key_value_heads=1, rope_parameters=dict(rope_type="default", rope_theta=500000.0)), True),
    ],
    ids=["untied", "untied-scan", "tied", "tied-llama3-scan", "llama3", "linear-rope", "mqa-theta-scan"],
)
def test_tiny_parity(tmp_path, overrides, scan):
    path, hf_model = make_tiny_hf(tmp_path, **overrides)
    config, params = hf_ckpt.load_hf(path, scan_layers=scan)
    assert config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert ("lm_head" in params) != config.tie_word_embeddings
    model = Llama(config)
    rng = np.random.default_rng(0)
    for left in (True, False):
        ids, mask = ragged_batch(rng, config.vocab_size, [11, 7, 3], left=left)
        ours = jax_logits(model, params, ids, mask)
        ref = torch_logits(hf_model, ids, mask)
        assert max_masked_diff(ours, ref, mask) < 1e-4


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (ROPE_LLAMA3, dict(rope_type="linear", rope_theta=5000.0, factor=2.0)):
        hf_cfg = transformers.LlamaConfig(**TINY, rope_parameters=rope)
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
        ours = rope_inv_freq(LlamaConfig.from_hf_config(hf_cfg.to_dict()))
        np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)


def test_scan_conversion_roundtrip(tmp_path):
    path, _ = make_tiny_hf(tmp_path)
    config, params = hf_ckpt.load_hf(path)
    _, scanned = hf_ckpt.load_hf(path, scan_layers=True)
    restacked = stack_layers(params, config.num_layers)
    jax.tree.map(np.testing.assert_array_equal, restacked, scanned)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned), params)


def test_save_hf_roundtrip(tmp_path):
    path, hf_model = make_tiny_hf(tmp_path, tie_word_embeddings=False)
    config, params = hf_ckpt.load_hf(path, scan_layers=True)
    out = hf_ckpt.save_hf(params, config, tmp_path / "export")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids, mask = ragged_batch(np.random.default_rng(1), config.vocab_size, [9, 5], left=True)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(hf_model, ids, mask), atol=1e-6)


def test_sharded_index_and_placement(tmp_path):
    """A sharded checkpoint (index.json) loads, and each tensor lands directly in its target sharding."""
    path, hf_model = make_tiny_hf(tmp_path)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    pick = lambda path_, shape: by_rows if shape[0] % jax.device_count() == 0 else replicated  # noqa: E731
    config, params = hf_ckpt.load_hf(sharded, param_dtype=jnp.bfloat16, shardings=pick)
    emb = params["embed_tokens"]["embedding"]
    assert emb.dtype == jnp.bfloat16 and emb.sharding == by_rows
    _, ref = hf_ckpt.load_hf(path)
    np.testing.assert_allclose(np.asarray(emb, np.float32), ref["embed_tokens"]["embedding"], atol=1e-2)


def test_logical_axis_annotations():
    import flax.linen as nn

    from rsllm_jax.models.lora import LoraConfig

    base = LlamaConfig.from_hf_config({**TINY, "tie_word_embeddings": False})
    ids = jnp.ones((1, 4), jnp.int32)
    for scan in (False, True):
        config = LlamaConfig(**{**base.__dict__, "scan_layers": scan})
        model = Llama(config, lora=LoraConfig(rank=2, targets=("q_proj", "down_proj")))
        specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]
        layer = specs["layers"] if scan else specs["layers_0"]
        lead = ("layers",) if scan else ()
        P = jax.sharding.PartitionSpec
        assert specs["embed_tokens"]["embedding"] == P("vocab", "embed")
        assert specs["lm_head"]["kernel"] == P("embed", "vocab")
        assert specs["norm"]["scale"] == P("embed")
        attn, mlp = layer["self_attn"], layer["mlp"]
        assert attn["q_proj"]["kernel"] == P(*lead, "embed", "heads", "head_dim")
        assert attn["k_proj"]["kernel"] == P(*lead, "embed", "kv_heads", "head_dim")
        assert attn["v_proj"]["kernel"] == P(*lead, "embed", "kv_heads", "head_dim")
        assert attn["o_proj"]["kernel"] == P(*lead, "heads", "head_dim", "embed")
        assert mlp["gate_proj"]["kernel"] == P(*lead, "embed", "mlp")
        assert mlp["down_proj"]["kernel"] == P(*lead, "mlp", "embed")
        assert layer["input_layernorm"]["scale"] == P(*lead, "embed")
        assert attn["q_proj"]["lora_a"] == P(*lead, "embed", "lora_rank")
        assert attn["q_proj"]["lora_b"] == P(*lead, "lora_rank", "heads", "head_dim")
        assert mlp["down_proj"]["lora_b"] == P(*lead, "lora_rank", "embed")
        assert "lora_a" not in attn["k_proj"]


def test_sharded_init_and_forward_on_mesh():
    """Abstract init -> logical specs -> mesh shardings -> jitted sharded init and forward on a (2,2,2) mesh."""
    import flax.linen as nn

    config = LlamaConfig.from_hf_config({**TINY, "tie_word_embeddings": True}, scan_layers=True, remat_policy="full")
    model = Llama(config)
    from configs import base
    from rsllm_jax.sharding import rules_from_config

    rules = rules_from_config(base.get_config().mesh.rules)

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ids = jnp.ones((4, 8), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), ids)
        q = variables["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.value.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        logits = jax.jit(model.apply)(variables, ids)  # sharded params and activations
    assert logits.shape == (4, 8, config.vocab_size) and bool(jnp.isfinite(logits).all())
