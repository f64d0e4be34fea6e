"""Section 4: this machine's f32 matmul peak, measured in the same process as the workloads.

MFU needs a denominator; a CPU's datasheet peak is rarely reachable and depends on clocks, SIMD width
and what else runs, so we measure the best square-matmul throughput each framework gets here and
now (best of `repeats` after one warm-up, per size) and use that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import flops, timing


def _best_gflops(fn, n: int, repeats: int) -> float:
    fn()  # warm-up (JIT compile, thread pool spin-up)
    best = min(timing.timed(fn)[0] for _ in range(max(repeats, 1)))
    return flops.matmul_flops(n) / best / 1e9


def jax_gflops(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]  # the benchmarks' one device
    a, b = (jax.device_put(rng.standard_normal((n, n), np.float32), dev) for _ in range(2))
    dot = jax.jit(jnp.dot)
    return _best_gflops(lambda: dot(a, b).block_until_ready(), n, repeats)


def torch_gflops(n: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return _best_gflops(lambda: torch.matmul(a, b), n, repeats)


def run(*, sizes: list[int], repeats: int) -> dict:
    jax_res = {str(n): jax_gflops(n, repeats) for n in sizes}
    torch_res = {str(n): torch_gflops(n, repeats) for n in sizes}
    peak = dict(jax=max(jax_res.values()), torch=max(torch_res.values()))
    peak["machine"] = max(peak.values())
    return dict(gflops=dict(jax=jax_res, torch=torch_res), peak_gflops=peak, dtype="float32",
                method=f"best of {repeats} after 1 warm-up, 2*n^3 FLOPs per n x n matmul",
                torch_threads=torch.get_num_threads())
