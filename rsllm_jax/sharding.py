"""Device mesh and logical-axis rules: the only place mesh axis names meet model axis names.

Model code names its axes logically ('batch', 'embed', 'mlp', ...); the config's rules map those
names onto the ('data', 'fsdp', 'tensor') mesh, so changing the layout never touches model code.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolve one -1 entry to 'whatever devices are left'; check the product."""
    dims = [data, fsdp, tensor]
    if dims.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dims}")
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        if num_devices % rest:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {dims}")
        dims[dims.index(-1)] = num_devices // rest
    if math.prod(dims) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(dims)} but {num_devices} devices are available "
            "(set config.mesh.* so the product matches, or use -1 for one axis)"
        )
    return tuple(dims)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
    # Auto axis types: shardings come from jit in/out specs and flax logical constraints.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Config holds rules as a list of [logical, mesh-axis | [mesh-axes] | None] (configs/base.py's
    `mesh.rules` are the defaults)."""
    out = []
    for logical, target in rules:
        out.append((logical, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(out)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_shardings(abstract_tree, mesh, rules):
    """Shardings for a tree of nn.Partitioned/LogicallyPartitioned leaves (unannotated -> replicated)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local_batch, mesh):
    """Assemble per-process host arrays into global jax.Arrays sharded along the batch axis."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        local_batch,
    )


def max_across_processes(value: int) -> int:
    """The largest `value` any process holds (a tiny all-gather; free when single-process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def host_to_global(x, mesh):
    """A host array that every process holds in full -> a global jax.Array, batch-sharded when the
    batch divides over the data-parallel devices (else replicated). Used for evaluation inputs."""
    x = np.asarray(x)
    n_data = mesh.shape["data"] * mesh.shape["fsdp"]
    sh = batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] % n_data == 0 else replicated(mesh)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def to_host(x) -> np.ndarray:
    """A global jax.Array -> the full value as numpy on every process."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
