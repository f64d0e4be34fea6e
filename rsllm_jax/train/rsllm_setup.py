"""Assemble RSLLM's parameters: load what exists, initialise only what is missing, inside one jit.

The pretrained LLM (and, in stage 2, the SASRec table and the stage-1 LoRA) are loaded straight into
their target shardings; a jitted `partial_init` then runs `model.init` and keeps a fresh value only
for leaves that were not loaded (LoRA factors, projector, added-token rows). XLA drops the random
initialisation of every loaded leaf as dead code, and the loaded buffers are donated, so the big
tree never exists twice (big_vision's PaliGemma recipe).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rsllm_jax import sharding
from rsllm_jax.checkpoint.loader import load_llm
from rsllm_jax.models.lora import LoraConfig, split_trainable, trainable_matcher
from rsllm_jax.models.rsllm import RSLLM, RSLLMConfig

NUM_ADDED_TOKENS = 2  # [IID] and the optional marker (data/prompts.py)
MASTER_DTYPE = jnp.float32  # trained leaves (and so their optimizer state), whatever config.llm.param_dtype


@dataclasses.dataclass
class Built:
    model: RSLLM
    tokenizer: Any
    params: dict  # the whole tree, sharded
    shardings: dict  # NamedSharding per leaf, same structure
    trainable_regexes: tuple[str, ...]

    def split(self):
        """(trainable, frozen), (trainable shardings, frozen shardings)."""
        return split_trainable(self.params, self.trainable_regexes), split_trainable(self.shardings, self.trainable_regexes)


def lora_config(cfg) -> LoraConfig | None:
    if not cfg.lora.rank:
        return None
    return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=tuple(cfg.lora.targets))


def dummy_inputs(num_items: int, length: int = 8):
    ids = jnp.zeros((1, length), jnp.int32)
    slots = jnp.full((1, length), -1, jnp.int32).at[0, 1].set(0 if num_items else -1)
    return ids, jnp.ones((1, length), jnp.int32), slots


def build_rsllm(
    cfg, mesh, *, num_items: int = 0, rec_table: np.ndarray | None = None,
    extra_params: dict | None = None, llm=None, seed: int = 0,
) -> Built:
    """cfg: the run config (llm, lora, trainable, mesh.rules). `extra_params`: a sparse tree of
    already-trained leaves (e.g. stage 1's LoRA) placed over the fresh ones. `llm`: an already
    loaded (config, params, tokenizer) triple, e.g. a random tiny model in tests."""
    rules = sharding.rules_from_config(cfg.mesh.rules)
    dtype, param_dtype = jnp.dtype(cfg.llm.dtype), jnp.dtype(cfg.llm.param_dtype)
    if llm is None:
        llm = load_llm(cfg.llm.model, dtype=dtype, param_dtype=param_dtype,
                       scan_layers=cfg.llm.scan_layers, remat_policy=cfg.llm.remat_policy)
        llm_config, llm_params, tokenizer = llm
    else:
        # The loaded buffers are donated below: copy a caller's arrays so the caller keeps them.
        llm_config, llm_params, tokenizer = llm
        llm_params = jax.tree.map(lambda x: jnp.array(x, copy=True), llm_params)
    rec_dim = 0 if rec_table is None else int(rec_table.shape[1])
    model = RSLLM(
        RSLLMConfig(llm=llm_config, num_added_tokens=NUM_ADDED_TOKENS, num_items=num_items, rec_dim=rec_dim or 64,
                    user_slot=bool(num_items) and bool(cfg.prompts.get("user_slot", False))),
        dtype=dtype, param_dtype=param_dtype, lora=lora_config(cfg),
    )
    inputs = dummy_inputs(num_items)

    def init(rng):
        return model.init(rng, *inputs)["params"]

    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init, jax.random.key(seed))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    flat_sh = traverse_util.flatten_dict(shardings, sep="/")

    loaded: dict[str, Any] = {f"llm/{k}": v for k, v in traverse_util.flatten_dict(llm_params, sep="/").items()}
    if rec_table is not None:
        if rec_table.shape[0] != num_items:
            raise ValueError(f"SASRec table has {rec_table.shape[0]} rows but the dataset has {num_items} items")
        loaded["rec/item_table"] = jnp.asarray(rec_table, param_dtype)
    if extra_params:
        loaded.update(traverse_util.flatten_dict(extra_params, sep="/"))
    unknown = sorted(set(loaded) - set(flat_sh))
    if unknown:
        raise ValueError(f"loaded parameters not in the model: {unknown[:5]} (config mismatch: scan_layers? lora?)")
    expected_shapes = traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
    for k, v in loaded.items():
        expected = expected_shapes[k]
        if tuple(v.shape) != tuple(expected.shape):
            raise ValueError(f"parameter {k}: loaded shape {tuple(v.shape)} != model shape {tuple(expected.shape)}")
    # Trained leaves (LoRA, projector, added rows) are fp32 master weights whatever param_dtype is: a bf16
    # update of a bf16 weight loses every step smaller than 2^-8 of it. The frozen base is stored in param_dtype.
    is_trained = trainable_matcher(tuple(cfg.trainable))
    dtype_of = lambda k: MASTER_DTYPE if is_trained(k) else param_dtype  # noqa: E731
    loaded = {k: jax.device_put(v.astype(dtype_of(k)), flat_sh[k]) for k, v in loaded.items()}

    def partial_init(rng, loaded_flat):
        fresh = traverse_util.flatten_dict(nn.meta.unbox(model.init(rng, *inputs)["params"]), sep="/")
        fresh = {k: v.astype(dtype_of(k)) for k, v in fresh.items()}
        fresh.update(loaded_flat)
        return traverse_util.unflatten_dict(fresh, sep="/")

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(partial_init, out_shardings=shardings, donate_argnums=1)(jax.random.key(seed), loaded)
    return Built(model=model, tokenizer=tokenizer, params=params, shardings=shardings,
                 trainable_regexes=tuple(cfg.trainable))
