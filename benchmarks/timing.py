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
