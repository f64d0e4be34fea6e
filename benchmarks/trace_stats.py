"""Aggregates a jax.profiler trace (the newest *.trace.json.gz under a directory) by XLA operation."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def top_ops(trace_dir: str, n: int = 25) -> list[tuple[str, float, int]]:
    """Sum complete-event durations by name over the newest trace file: (name, ms, count)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] / 1e3
            count[e["name"]] += 1
    return [(k, round(v, 1), count[k]) for k, v in total.most_common(n)]


# Framework/runtime bookkeeping events that enclose the XLA operations (counting them double-counts).
_WRAPPERS = ("ThunkExecutor", "block_until_ready", "stop_trace", "SlinkyThreadPool", "PjitFunction",
             "ExecuteHelper", "DevicePut", "ThreadpoolListener")


def categories(trace_dir: str, steps: int) -> dict[str, float]:
    """Per-step milliseconds of the XLA operations, grouped: matmuls (`ynn_fusion*` / `dot*`: XLA:CPU
    hands dots to YNNPACK), transposing copies, other (elementwise/reduction) fusions, the rest."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    out = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith(("$", "end:")) or any(w in name for w in _WRAPPERS):
            continue
        if name.startswith(("ynn_fusion", "dot")):
            key = "matmul (ynn_fusion / dot)"
        elif "copy" in name or "transpose" in name:
            key = "transposing copy"
        elif "fusion" in name:
            key = "elementwise / reduction fusion"
        else:
            key = "other: " + name.rstrip("0123456789").rstrip("._")
        out[key] += e["dur"] / 1e3 / steps
    return {k: round(v, 1) for k, v in out.most_common()}
