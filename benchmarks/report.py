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


def decode_roofline(results: dict) -> dict | None:
    """A lower bound on one decode call on this machine, whatever the framework: the prefill at the
    measured matmul peak, then every decode step streaming the LLM weights at the measured memory
    bandwidth (batch rows share one read). Compared with what the 2x target asks for."""
    dec, mm = results.get("decode"), results.get("matmul")
    if not dec or not mm or "memory_bandwidth" not in mm or "llm_weight_bytes" not in dec:
        return None
    shape = dec["shape"]
    bw = mm["memory_bandwidth"]["gb_per_s"] * 1e9
    prefill_s = dec["prefill_flops"] / (mm["peak_gflops"]["machine"] * 1e9)
    steps_s = (shape["new_tokens"] - 1) * dec["llm_weight_bytes"] / bw
    floor_s = prefill_s + steps_s
    target_s = dec["torch"]["median_s"] / DECODE_SPEEDUP_TARGET
    return dict(prefill_floor_s=prefill_s, decode_steps_floor_s=steps_s, floor_s=floor_s,
                max_tokens_per_s=shape["batch"] * shape["new_tokens"] / floor_s,
                target_s=target_s, target_below_floor=target_s < floor_s,
                jax_s=dec["jax"]["median_s"], jax_over_floor=dec["jax"]["median_s"] / floor_s,
                torch_over_floor=dec["torch"]["median_s"] / floor_s)


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
        b = results["matmul"].get("bf16_peak_gflops")
        if b:
            lines[-1] += f" bf16 (fp32 accumulation): jax {b['jax']:.1f}, torch {b['torch']:.1f} GFLOP/s."
    if "matmul" in results and "memory_bandwidth" in results["matmul"]:
        lines += ["", f"Measured memory bandwidth: {results['matmul']['memory_bandwidth']['gb_per_s']:.1f} GB/s "
                      f"({results['matmul']['memory_bandwidth']['method']})."]
    roof = results.get("decode_roofline")
    if roof:
        lines += ["", f"Decode floor on this machine (prefill at the matmul peak + every step streaming the "
                      f"{results['decode']['llm_weight_bytes'] / 2**20:.0f} MiB of LLM weights at the measured "
                      f"bandwidth): {roof['floor_s']:.2f} s per call = {roof['max_tokens_per_s']:.1f} new tokens/s "
                      f"at most. JAX is at {roof['jax_over_floor']:.2f}x the floor, torch at "
                      f"{roof['torch_over_floor']:.2f}x; 2x torch would need {roof['target_s']:.2f} s"
                      + (" — below the floor, unreachable here." if roof["target_below_floor"] else ".")]
    if "windows" in results:
        w = results["windows"]
        lines += ["", f"Stage-2 training windows/s on {w['windows']} real MovieLens windows of the default recipe "
                      f"(batch {w['batch']}, LoRA dropout {w.get('lora_dropout', '-')}):", "",
                  "| impl | batching | padding fraction | shapes (compiles) | compile s | windows/s | vs torch |",
                  "|---|---|---|---|---|---|---|"]
        t = w["torch"]
        for name, r in w["jax"].items():
            lines.append(f"| jax | {name} | {r['padding_fraction']:.3f} | {len(r['shapes'])} | {r['compile_s']:.1f} | "
                         f"{r['windows_per_s']:.3f} | {r['windows_per_s'] / t['windows_per_s']:.2f}x |")
        lines.append(f"| torch | each batch to its longest row | {t['padding_fraction']:.3f} | - | - | "
                     f"{t['windows_per_s']:.3f} | 1.00x |")
        if "torch_bf16" in w:
            tb = w["torch_bf16"]
            lines.append(f"| torch | each batch to its longest row, bf16 autocast | {tb['padding_fraction']:.3f} | - | - "
                         f"| {tb['windows_per_s']:.3f} | {tb['windows_per_s'] / t['windows_per_s']:.2f}x |")
    if "train" in results:
        lines += ["", "| first-step loss | jax | torch | abs diff | ok |", "|---|---|---|---|---|"]
        for k, v in results["train"]["losses"].items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['jax']:.6f} | {v['torch']:.6f} | {v['abs_diff']:.2e} | {v['ok']} |")
    if results.get("targets"):
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {k} | {v['value']:.3g} | {v['met']} |" for k, v in results["targets"].items()]
    return "\n".join(lines) + "\n"
