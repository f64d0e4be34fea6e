"""Projector (spec §3): maps a frozen SASRec item embedding (64-d) into the LLM's input space.

Dense(d_llm) -> GELU -> Dense(d_llm), as in LLaRA. Trained in stage 2; the only params weight decay hits.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Projector(nn.Module):
    d_llm: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, rec_embedding: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(  # noqa: E731
            self.d_llm, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )
        x = dense("fc1")(rec_embedding.astype(self.dtype))
        return dense("fc2")(nn.gelu(x, approximate=False))
