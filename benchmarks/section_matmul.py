"""Section 4: this machine's f32 (and bf16) matmul peak, measured in the same process as the workloads.

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


def jax_gflops(n: int, repeats: int, dtype: str = "float32") -> float:
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]  # the benchmarks' one device
    a, b = (jax.device_put(rng.standard_normal((n, n), np.float32).astype(jnp.dtype(dtype)), dev) for _ in range(2))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))  # bf16: fp32 accumulation
    return _best_gflops(lambda: dot(a, b).block_until_ready(), n, repeats)


def torch_gflops(n: int, repeats: int, dtype: str = "float32") -> float:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(getattr(torch, dtype)) for _ in range(2))
    return _best_gflops(lambda: torch.matmul(a, b), n, repeats)


def memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Streaming bandwidth: best time of `y = x * 2` over a `mib` MiB f32 array (one read + one write),
    far larger than any cache. Memory-bound work such as decoding (every weight read once per token)
    is bounded by this, not by the matmul peak."""
    n = mib * 2**20 // 4
    x = jax.device_put(np.ones(n, np.float32), jax.devices()[0])
    double = jax.jit(lambda v: v * 2)
    double(x).block_until_ready()
    best = min(timing.timed(lambda: double(x).block_until_ready())[0] for _ in range(max(repeats, 1)))
    return dict(gb_per_s=2 * n * 4 / best / 1e9, mib=mib, method=f"best of {repeats}: y = 2x over {mib} MiB "
                "f32, bytes = read + write")


def run(*, sizes: list[int], repeats: int, bandwidth_mib: int = 512) -> dict:
    jax_res = {str(n): jax_gflops(n, repeats) for n in sizes}
    torch_res = {str(n): torch_gflops(n, repeats) for n in sizes}
    peak = dict(jax=max(jax_res.values()), torch=max(torch_res.values()))
    peak["machine"] = max(peak.values())
    # bf16 (AMX / AVX512-BF16 where the CPU has them): the ceiling a bf16-compute train step can approach.
    bf16 = dict(jax={str(n): jax_gflops(n, repeats, "bfloat16") for n in sizes},
                torch={str(n): torch_gflops(n, repeats, "bfloat16") for n in sizes})
    return dict(gflops=dict(jax=jax_res, torch=torch_res), peak_gflops=peak, dtype="float32",
                bf16_gflops=bf16, bf16_peak_gflops={k: max(v.values()) for k, v in bf16.items()},
                memory_bandwidth=memory_bandwidth(bandwidth_mib),
                method=f"best of {repeats} after 1 warm-up, 2*n^3 FLOPs per n x n matmul",
                torch_threads=torch.get_num_threads())
