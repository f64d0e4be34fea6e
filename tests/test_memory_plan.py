"""The ahead-of-time memory plan compiles the real stage-2 step on 8 fake devices without allocating it."""
import jax
import pytest

from configs import llama2_7b
from rsllm_jax.memory_plan import parse_layout, plan_one
from rsllm_jax.models.llama import LlamaConfig

# Weights large enough to dominate the arguments, small enough to compile in about a minute.
ARCH = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=32)


def test_parse_layout():
    assert parse_layout("data2_fsdp4") == dict(data=2, fsdp=4, tensor=1)
    assert parse_layout("fsdp4_tensor2") == dict(data=1, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="pipeline2"):
        parse_layout("pipeline2")


def test_fsdp_plan_shards_the_weights_that_data_parallel_replicates():
    cfg = llama2_7b.get_config()
    devices = jax.devices()[:8]
    fsdp = plan_one(cfg, ARCH, parse_layout("fsdp8"), 1, seq_len=64, accum=2, num_items=50, devices=devices)
    data = plan_one(cfg, ARCH, parse_layout("data8"), 1, seq_len=64, accum=2, num_items=50, devices=devices)
    for row in (fsdp, data):
        assert row["peak_bytes"] > 0 and row["temp_bytes"] > 0 and row["argument_bytes"] > 0
        assert row["global_batch_per_step"] == 16 and row["frozen_params"] > 1_000_000
    # bf16 frozen weights: replicated on every device under data=8, an eighth of them under fsdp=8.
    weights = data["frozen_params"] * 2
    assert data["argument_bytes"] > weights
    assert fsdp["argument_bytes"] < data["argument_bytes"] - 0.8 * weights
