"""Derived numbers (model GFLOP/s, MFU, the issue's targets) and the markdown table."""
from __future__ import annotations

# (section, unit of one timed call, throughput key, throughput unit, model-FLOPs key)
ROWS = (
    ("train", "step", "tokens_per_s", "tokens/s", "model_flops_per_step"),
    ("decode", "call", "tokens_per_s", "new tokens/s", "model_flops_per_call"),
    ("sasrec", "epoch", "samples_per_s", "samples/s", "model_flops_per_epoch"),
)
TRAIN_SPEEDUP_TARGET, MFU_TARGET, DECODE_SPEEDUP_TARGET = 1.5, 0.5, 2.0


def add_mfu(results: dict) -> None:
    """Per row: achieved model GFLOP/s and MFU against its framework's measured peak and the machine's."""
    peaks = results.get("matmul", {}).get("peak_gflops")
    for section, _, _, _, flops_key in ROWS:
        if section not in results:
            continue
        sec = results[section]
        for impl in ("jax", "torch"):
            r = sec[impl]
            r["model_gflops_per_s"] = sec[flops_key] / r["median_s"] / 1e9
            if peaks:
                r["mfu_vs_own_peak"] = r["model_gflops_per_s"] / peaks[impl]
                r["mfu_vs_machine_peak"] = r["model_gflops_per_s"] / peaks["machine"]


def targets(results: dict) -> dict:
    """The issue's targets, each with its measured value and whether it is met (None: not measured)."""
    out = {}
    if "train" in results:
        v = results["train"]["speedup"]
        out["train_step_speedup_vs_torch>=1.5"] = dict(value=v, met=v >= TRAIN_SPEEDUP_TARGET)
        if "mfu_vs_machine_peak" in results["train"]["jax"]:
            v = results["train"]["jax"]["mfu_vs_machine_peak"]
            out["train_step_mfu>=0.5_of_machine_matmul_peak"] = dict(value=v, met=v >= MFU_TARGET)
    if "decode" in results:
        v = results["decode"]["speedup"]
        out["decode_speedup_vs_transformers>=2"] = dict(value=v, met=v >= DECODE_SPEEDUP_TARGET)
    return out


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    header = ("| workload | impl | time per call s: median (min-max) | throughput | compile s | "
              "model GFLOP/s | MFU own peak | MFU machine peak |")
    lines = [header, "|" + "---|" * 8]
    for section, call, key, unit, _ in ROWS:
        if section not in results:
            continue
        for impl in ("jax", "torch"):
            r = results[section][impl]
            lines.append(
                f"| {section} ({call}) | {impl} | {r['median_s']:.4g} ({r['min_s']:.4g}-{r['max_s']:.4g}) | "
                f"{r[key]:.1f} {unit} | {_fmt(r.get('compile_s'))} | {r['model_gflops_per_s']:.3g} | "
                f"{_fmt(r.get('mfu_vs_own_peak'), '.1%')} | {_fmt(r.get('mfu_vs_machine_peak'), '.1%')} |")
    if "matmul" in results:
        p = results["matmul"]["peak_gflops"]
        sizes = ", ".join(results["matmul"]["gflops"]["jax"])
        lines += ["", f"Measured f32 matmul peak: jax {p['jax']:.1f} GFLOP/s, torch {p['torch']:.1f} GFLOP/s ({sizes})."]
    if "train" in results:
        lines += ["", "| first-step loss | jax | torch | abs diff | ok |", "|---|---|---|---|---|"]
        for k, v in results["train"]["losses"].items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['jax']:.6f} | {v['torch']:.6f} | {v['abs_diff']:.2e} | {v['ok']} |")
    if results.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {k} | {v['value']:.3g} | {v['met']} |" for k, v in results["targets"].items()]
    return "\n".join(lines) + "\n"
