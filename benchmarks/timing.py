"""Wall-clock timing shared by every section: warm-up calls, then repeated timed calls."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call; `fn` must block until its work is done."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def repeat(fn: Callable[[], object], *, repeats: int, warmup: int) -> dict:
    """Median/min/max seconds over `repeats` calls after `warmup` untimed ones (caches, allocator, JIT)."""
    for _ in range(warmup):
        fn()
    times = [timed(fn)[0] for _ in range(max(repeats, 1))]
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times)


def time_train_step(fn, state, batch, batch_sharding, rng, *, repeats: int, warmup: int):
    """Compile a jitted train step that donates its state, then time it (call it inside the mesh and
    logical-rules context). -> (timings + compile_s + first_step_s + first_step metrics, compiled)."""
    import jax

    compile_s, compiled = timed(lambda: fn.lower(state, jax.device_put(batch, batch_sharding), rng).compile())
    box = {"state": state}

    def step():
        # The state is donated: keep only the newest one.
        box["state"], metrics = compiled(box["state"], jax.device_put(batch, batch_sharding), rng)
        return jax.block_until_ready((box["state"], metrics))[1]

    first_s, metrics = timed(step)
    times = repeat(step, repeats=repeats, warmup=warmup)
    return dict(**times, compile_s=compile_s, first_step_s=first_s,
                first_step={k: float(v) for k, v in metrics.items()}), compiled
