#!/usr/bin/env python3
"""Hold the planner's cost model against what measure_device.py and measure_step.py measured.

    python benchmarks/gpu/compare.py --measured DIR [--device h100-sxm-80gb] [--markdown FILE]

Sections (each only when its CSV is in DIR):
  GEMM       planner.cost.compute.gemm_time_s vs measured, error by shape class and overall MAPE, and a
             scipy least-squares fit of the matmul efficiency and gemm_half_dim that best explain the
             measured bf16 (and fp8) GEMMs, beside the catalog's values
  memory     measured copy / x*2+y / sum bandwidth vs memory_bandwidth_gb_s x efficiency.memory
  launch     measured host dispatch and tiny-kernel device time vs host_dispatch_us, kernel_overhead_us
  attention  SDPA (flash) time vs the planner's attention efficiency (backward = 2.5 x forward)
  nccl       the one-process all_reduce floor beside NCCL's base latencies that planner.cost.comm uses
  step       planner.cost.estimate on one device for the same model, batch and recompute policy vs the
             measured step time, forward / backward / optimizer split and peak memory

Runs here, in the project's environment (numpy, scipy, planner); the measurements come from the GPU machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))

from planner import catalog  # noqa: E402
from planner.core.builders import TransformerConfig, build_transformer  # noqa: E402
from planner.core.errors import BadInput  # noqa: E402
from planner.core.hardware import Device  # noqa: E402
from planner.core.plan import ParallelPlan, Workload  # noqa: E402
from planner.cost import comm  # noqa: E402
from planner.cost.compute import ATTENTION_BWD_FACTOR, gemm_time_s  # noqa: E402
from planner.cost.estimate import estimate  # noqa: E402

GiB = 2**30
# Sizes at or above this are out of every current L2 (H100 50 MB, B200 126 MB): the HBM bandwidth regime.
HBM_REGIME_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------------
# input / output

def read_csv(path: Path) -> list[dict]:
    """Rows with numeric fields as floats; empty fields as None."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if v is None or v == "":
                    out[k] = None
                    continue
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
            rows.append(out)
    return rows


def atomic_write_text(path: Path, text: str) -> None:
    from planner.files import write_atomic  # compare.py runs here, beside the planner

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def table(headers: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out + [""]


def pct(pred, meas) -> float:
    return 100.0 * (pred - meas) / meas


def mape(pred, meas) -> float:
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return float(np.mean(np.abs(pred - meas) / meas) * 100) if len(meas) else float("nan")


def with_efficiency(dev: Device, **fields) -> Device:
    return dev.model_copy(update={"efficiency": dev.efficiency.model_copy(update=fields)})


# ----------------------------------------------------------------------------------------------------
# GEMM

def fp8_cast_s(m, k, dev: Device):
    """The input-cast term gemm_time_s adds to fp8 GEMMs (mirrors planner/cost/compute.py): measured 'fp8'
    rows time torch._scaled_mm on tensors already in fp8, so this is taken off their prediction."""
    e = dev.efficiency
    return 3 * np.asarray(m, float) * k / (dev.memory_bandwidth_bytes_per_s * e.memory) + e.kernel_overhead_us * 1e-6


def predict_gemm_s(rows: list[dict], dev: Device) -> np.ndarray:
    """Planner time per measured row. dtype 'bf16' and 'fp8_cast' (bf16 input cast, then the fp8 GEMM, the
    Transformer Engine pattern) are what gemm_time_s models; 'fp8' is the GEMM alone."""
    out = np.empty(len(rows))
    for dt in {r["dtype"] for r in rows}:
        idx = [i for i, r in enumerate(rows) if r["dtype"] == dt]
        m = np.array([rows[i]["m"] for i in idx])
        n = np.array([rows[i]["n"] for i in idx])
        k = np.array([rows[i]["k"] for i in idx])
        planner_dtype = "fp8" if dt.startswith("fp8") else dt
        t = gemm_time_s(m, n, k, dev, planner_dtype)
        if dt == "fp8":
            t = t - fp8_cast_s(m, k, dev)
        out[idx] = t
    return out


def fit_gemm(rows: list[dict], dev: Device, eff_field: str) -> dict | None:
    """Least squares over log(predicted / measured) for (eff_field, gemm_half_dim), everything else held."""
    from scipy.optimize import least_squares

    if len(rows) < 3:
        return None
    meas = np.array([r["time_s"] for r in rows])
    start_eff = getattr(dev.efficiency, eff_field) or dev.efficiency.matmul

    def resid(x):
        d = with_efficiency(dev, **{eff_field: float(x[0]), "gemm_half_dim": float(x[1])})
        return np.log(predict_gemm_s(rows, d) / meas)

    x0 = [min(max(start_eff, 0.06), 0.99), max(dev.efficiency.gemm_half_dim, 1.0)]
    res = least_squares(resid, x0, bounds=([0.05, 0.0], [1.0, 16384.0]), loss="soft_l1", f_scale=0.1,
                        x_scale=[0.1, 100.0])
    fitted = with_efficiency(dev, **{eff_field: float(res.x[0]), "gemm_half_dim": float(res.x[1])})
    return {"field": eff_field, "eff": float(res.x[0]), "gemm_half_dim": float(res.x[1]),
            "mape_before": mape(predict_gemm_s(rows, dev), meas),
            "mape_after": mape(predict_gemm_s(rows, fitted), meas), "rows": len(rows)}


def gemm_section(rows: list[dict], dev: Device) -> list[str]:
    out = ["## GEMM", ""]
    rows = [r for r in rows if r.get("time_s") and r["time_s"] > 0]
    if not rows:
        return out + ["no GEMM rows", ""]
    pred = predict_gemm_s(rows, dev)
    for r, p in zip(rows, pred):
        r["pred_s"] = float(p)
        r["err_pct"] = pct(p, r["time_s"])
    e = dev.efficiency
    out.append(f"Planner: `gemm_time_s` with {dev.name} peaks {dev.peak_tflops.get('bf16')} / "
               f"{dev.peak_tflops.get('fp8', '-')} TFLOP/s (bf16 / fp8), matmul {e.matmul}, matmul_fp8 "
               f"{e.matmul_fp8}, gemm_half_dim {e.gemm_half_dim}, kernel_overhead_us {e.kernel_overhead_us}. "
               "Error = (predicted - measured) / measured; 'fp8' rows exclude the input cast, 'fp8_cast' "
               "rows include it.")
    out.append("")
    summary = []
    for dt in sorted({r["dtype"] for r in rows}):
        classes = sorted({r["shape_class"] for r in rows if r["dtype"] == dt})
        for cls in classes + ["all"]:
            sel = [r for r in rows if r["dtype"] == dt and (cls == "all" or r["shape_class"] == cls)]
            errs = np.array([r["err_pct"] for r in sel])
            tf = np.array([r["tflops"] for r in sel])
            summary.append([dt, cls, len(sel), float(np.median(tf)), float(np.max(tf)),
                            float(np.mean(np.abs(errs))), float(np.mean(errs)), float(errs.min()), float(errs.max())])
    out += table(["dtype", "shape class", "n", "median TFLOP/s", "max TFLOP/s", "MAPE %", "mean err %",
                  "min err %", "max err %"], summary)
    out.append(f"Overall MAPE: {mape([r['pred_s'] for r in rows], [r['time_s'] for r in rows]):.1f}% "
               f"over {len(rows)} GEMMs.")
    out.append("")

    # fit
    fits = []
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    for label, sel, field in [("bf16", bf16, "matmul"),
                              ("fp8 (GEMM alone)", [r for r in rows if r["dtype"] == "fp8"], "matmul_fp8"),
                              ("fp8 + input cast", [r for r in rows if r["dtype"] == "fp8_cast"], "matmul_fp8")]:
        f = fit_gemm(sel, dev, field)
        if f is None:
            continue
        catalog_eff = getattr(e, field)
        fits.append([label, f["rows"], field, catalog_eff if catalog_eff is not None else e.matmul, f["eff"],
                     e.gemm_half_dim, f["gemm_half_dim"], f["mape_before"], f["mape_after"]])
    if fits:
        out.append("### Fitted GEMM efficiency (scipy.optimize.least_squares, soft-L1 on log(predicted/measured))")
        out.append("")
        out += table(["GEMMs", "n", "field", "catalog", "fitted", "catalog gemm_half_dim", "fitted gemm_half_dim",
                      "MAPE % catalog", "MAPE % fitted"], fits)

    # the worst rows, to see where the model fails
    worst = sorted(rows, key=lambda r: -abs(r["err_pct"]))[:12]
    out.append("### Largest errors")
    out.append("")
    out += table(["dtype", "label", "m", "n", "k", "measured ms", "predicted ms", "TFLOP/s", "err %"],
                 [[r["dtype"], r.get("label"), int(r["m"]), int(r["n"]), int(r["k"]), r["time_s"] * 1e3,
                   r["pred_s"] * 1e3, r["tflops"], r["err_pct"]] for r in worst])
    return out


# ----------------------------------------------------------------------------------------------------
# memory bandwidth, launch, attention, nccl

def membw_section(rows: list[dict], dev: Device) -> list[str]:
    model_gb_s = dev.memory_bandwidth_gb_s * dev.efficiency.memory
    out = ["## Memory bandwidth", "",
           f"Planner: {dev.memory_bandwidth_gb_s} GB/s x efficiency.memory {dev.efficiency.memory} = "
           f"{model_gb_s:.0f} GB/s. Bytes moved = read + write (copy 2x, x*2+y 3x, sum 1x the tensor).", ""]
    body = []
    for r in sorted(rows, key=lambda r: (r["op"], r["size_bytes"])):
        body.append([r["op"], r["size_bytes"] / 2**20, r["gb_s"], r["gb_s"] / dev.memory_bandwidth_gb_s,
                     pct(model_gb_s, r["gb_s"])])
    out += table(["op", "MiB per tensor", "measured GB/s", "fraction of datasheet", "planner err %"], body)
    big = [r for r in rows if r["size_bytes"] >= HBM_REGIME_BYTES]
    if big:
        best = {}
        for r in big:
            best[r["op"]] = max(best.get(r["op"], 0.0), r["gb_s"])
        impl = ", ".join(f"{op} {v:.0f} GB/s = {v / dev.memory_bandwidth_gb_s:.3f}" for op, v in sorted(best.items()))
        out += [f"Implied efficiency.memory (best at >= {HBM_REGIME_BYTES // 2**20} MiB): {impl}; catalog "
                f"{dev.efficiency.memory}.", ""]
    return out


def launch_section(rows: list[dict], dev: Device) -> list[str]:
    e = dev.efficiency
    ref = {"host_dispatch_us": e.host_dispatch_us, "kernel_overhead_us": e.kernel_overhead_us}
    out = ["## Launch overheads", "",
           "host_dispatch_us: host time per eager op issued back to back; kernel_overhead_us: device time per "
           "tiny kernel replayed from a CUDA graph. The planner's kernel_overhead_us also absorbs the per-GEMM "
           "fill and drain, so the tiny-kernel number is its floor, not its value.", ""]
    out += table(["metric", "op", "measured us", "planner us", "method"],
                 [[r["metric"], r["op"], r["value_us"], ref.get(r["metric"]), r["method"]] for r in rows])
    return out


def attention_section(rows: list[dict], dev: Device) -> list[str]:
    peak = dev.peak_flops("bf16")
    eff = dev.efficiency.attention
    out = ["## Attention (scaled_dot_product_attention, causal)", "",
           f"Planner: forward FLOPs (2 x b x s^2 x heads x 2 x head_dim, halved when causal) at "
           f"efficiency.attention {eff} of the bf16 peak; backward {ATTENTION_BWD_FACTOR} x forward.", ""]
    body, implied_f, implied_fb = [], [], []
    for r in rows:
        flops = r["fwd_flops"]
        p_f = flops / (peak * eff)
        p_fb = p_f * (1 + ATTENTION_BWD_FACTOR)
        implied_f.append(flops / (r["fwd_s"] * peak))
        implied_fb.append((1 + ATTENTION_BWD_FACTOR) * flops / (r["fwd_bwd_s"] * peak))
        body.append([f"{int(r['batch'])}x{int(r['heads'])}x{int(r['seq'])}x{int(r['head_dim'])}", r["backend"],
                     r["fwd_s"] * 1e3, p_f * 1e3, pct(p_f, r["fwd_s"]), r["fwd_bwd_s"] * 1e3, p_fb * 1e3,
                     pct(p_fb, r["fwd_bwd_s"]), implied_f[-1], implied_fb[-1],
                     r["bwd_s"] / r["fwd_s"] if r["fwd_s"] else None])
    out += table(["b x heads x seq x hd", "backend", "fwd ms", "pred ms", "err %", "fwd+bwd ms", "pred ms",
                  "err %", "implied eff fwd", "implied eff fwd+bwd", "bwd/fwd"], body)
    out += [f"Median implied attention efficiency: forward {np.median(implied_f):.3f}, forward+backward "
            f"{np.median(implied_fb):.3f}; catalog {eff}.", ""]
    return out


def nccl_section(rows: list[dict], dev: Device) -> list[str]:
    out = ["## NCCL (one process, world size 1)", "",
           "A one-rank all_reduce moves no data between GPUs: what it measures is the per-call floor of the "
           "NCCL launch path on this machine. planner.cost.comm charges base latencies of "
           f"{comm.NCCL_RING_BASE_LATENCY_S * 1e6:.1f} us (ring, LL) to {comm.NCCL_SIMPLE_BASE_LATENCY_S * 1e6:.1f} us "
           "(Simple) per collective (NCCL tuning.cc), plus per-hop latency.", ""]
    out += table(["size bytes", "device us", "host wall us"],
                 [[int(r["size_bytes"]), r["time_s"] * 1e6, r.get("host_wall_s", 0) * 1e6] for r in rows])
    floor = min(r["time_s"] for r in rows)
    out += [f"Floor: {floor * 1e6:.1f} us per call.", ""]
    return out


# ----------------------------------------------------------------------------------------------------
# training step

def one_device_cluster(dev: Device):
    """dgx-h100 cut to one device, with that device swapped for `dev` (any catalog device)."""
    cluster = catalog.load_cluster("dgx-h100", nodes=1, devices=1)
    ref = cluster.devices[0]
    return cluster.model_copy(update={"devices": [ref.model_copy(update={"device": dev})]})


def predict_step(r: dict, dev: Device):
    cfg = TransformerConfig(
        name=f"{r['name']}", layers=int(r["layers"]), hidden=int(r["hidden"]), heads=int(r["heads"]),
        kv_heads=int(r["kv_heads"]), ffn_hidden=int(r["ffn"]), vocab=int(r["vocab"]),
        max_seq=max(int(r["seq"]), 1), gated_mlp=True, norm="rmsnorm", position="rope", tied_embeddings=False)
    model = build_transformer(cfg)
    workload = Workload(global_batch=int(r["mbs"]), seq_len=int(r["seq"]), dtype="bf16", optimizer="adamw")
    plan = ParallelPlan(mbs=int(r["mbs"]), recompute="full" if int(r["checkpoint"]) else "none")
    return model, estimate(model, one_device_cluster(dev), workload, plan)


def step_section(rows: list[dict], dev: Device) -> list[str]:
    out = ["## Training step (one device)", "",
           "Planner: `estimate` for the same decoder (TransformerConfig, SwiGLU, RMSNorm, RoPE, untied head), "
           "global batch = mbs (one micro-batch), bf16, AdamW, recompute full when checkpointed. Measured: "
           "torch.autocast bf16 with fp32 parameters and grads (16 B/param of states + 2 B/param of autocast "
           "weight copies) vs the planner's bf16 weights + fp32 grads + fp32 master and moments (18 B/param).",
           ""]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("step_time_s")]
    skipped = [r for r in rows if r.get("status") != "ok"]
    time_rows, mem_rows = [], []
    t_pred, t_meas, m_pred, m_meas = [], [], [], []
    for r in ok:
        try:
            model, est = predict_step(r, dev)
        except (BadInput, ValueError) as e:
            time_rows.append([r["name"], "-", "-", "-", f"planner refused: {e}"] + ["-"] * 6)
            continue
        tag = f"{r['name']} s{int(r['seq'])} b{int(r['mbs'])}{' ckpt' if int(r['checkpoint']) else ''}"
        st = est.stages[0] if est.stages else {}
        opt_pred = est.breakdown.get("optimizer_s", 0.0)
        time_rows.append([tag, int(r["params"]), int(model.params), r["step_time_s"] * 1e3, est.step_time_s * 1e3,
                          pct(est.step_time_s, r["step_time_s"]), r["fwd_s"] * 1e3, st.get("fwd_s", 0) * 1e3,
                          r["bwd_s"] * 1e3, st.get("bwd_s", 0) * 1e3, r["opt_s"] * 1e3, opt_pred * 1e3,
                          est.mfu, est.why])
        t_pred.append(est.step_time_s)
        t_meas.append(r["step_time_s"])
        mem = est.memory
        no_overhead = mem.get("total_bytes", est.peak_memory_bytes) - mem.get("overhead_bytes", 0.0)
        states = mem.get("weights_bytes", 0) + mem.get("gradients_bytes", 0) + mem.get("optimizer_bytes", 0)
        meas_states = (r["model_state_bytes"] or 0) + 4 * r["params"]  # + the fp32 grads alive at the peak
        mem_rows.append([tag, r["peak_allocated_bytes"] / GiB, no_overhead / GiB,
                         pct(no_overhead, r["peak_allocated_bytes"]), r["peak_reserved_bytes"] / GiB,
                         est.peak_memory_bytes / GiB, pct(est.peak_memory_bytes, r["peak_reserved_bytes"]),
                         meas_states / GiB, states / GiB, mem.get("activations_bytes", 0) / GiB])
        m_pred.append(no_overhead)
        m_meas.append(r["peak_allocated_bytes"])
    out += table(["config", "params", "planner params", "step ms", "pred ms", "err %", "fwd ms", "pred fwd",
                  "bwd ms", "pred bwd", "opt ms", "pred opt", "pred MFU", "planner: why"], time_rows)
    out += ["Memory (GiB). 'pred w/o overhead' is the planner's states + activations, against "
            "max_memory_allocated; 'pred total' adds its allocator overhead and CUDA context, against "
            "max_memory_reserved (which has no context).", ""]
    out += table(["config", "peak alloc", "pred w/o overhead", "err %", "peak reserved", "pred total", "err %",
                  "measured states+grads", "pred states", "pred activations"], mem_rows)
    if t_meas:
        out += [f"Step time MAPE {mape(t_pred, t_meas):.1f}%, peak allocated memory MAPE "
                f"{mape(m_pred, m_meas):.1f}% over {len(t_meas)} configurations.", ""]
    if skipped:
        out += [f"Not measured: {', '.join(str(r['name']) + ' (' + str(r.get('status')) + ')' for r in skipped)}.", ""]
    return out


# ----------------------------------------------------------------------------------------------------

def compare(measured: Path, device_name: str) -> str:
    dev = catalog.device(device_name)
    lines = [f"# Measured vs planner: {device_name}", ""]
    info_path = measured / "device.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        props = info.get("properties", {})
        smi = info.get("nvidia_smi")
        gpu = smi["gpus"][0] if isinstance(smi, dict) and smi.get("gpus") else {}
        lines += [f"Measured on: {props.get('name', info.get('device_type'))}, torch {info.get('torch')}, CUDA "
                  f"{info.get('cuda_runtime')}, driver {gpu.get('driver_version', '-')}, max SM clock "
                  f"{gpu.get('clocks.max.sm', '-')}, power limit {gpu.get('power.limit', '-')}, "
                  f"{info.get('date_utc')}{' (quick)' if info.get('quick') else ''}. fp8: {info.get('gemm_fp8', '-')}.",
                  ""]
        if info.get("device_type") != "cuda":
            lines += ["**Measured on a CPU (test run): the comparison below is meaningless for the device.**", ""]
    sections = [("gemm.csv", gemm_section), ("membw.csv", membw_section), ("launch.csv", launch_section),
                ("attention.csv", attention_section), ("nccl.csv", nccl_section), ("step.csv", step_section)]
    found = False
    for fname, fn in sections:
        path = measured / fname
        if not path.exists():
            lines += [f"({fname} not measured)", ""]
            continue
        rows = read_csv(path)
        if not rows:
            lines += [f"({fname} is empty)", ""]
            continue
        found = True
        lines += fn(rows, dev)
    if not found:
        raise BadInput(f"{measured}: none of gemm.csv, membw.csv, launch.csv, attention.csv, nccl.csv, step.csv")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", required=True, type=Path, help="folder the measure_*.py scripts wrote")
    ap.add_argument("--device", default="h100-sxm-80gb", help="catalog device to compare with")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file (atomically)")
    args = ap.parse_args(argv)
    try:
        if not args.measured.is_dir():
            raise BadInput(f"--measured {args.measured}: not a folder")
        report = compare(args.measured, args.device)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report, end="")
    if args.markdown:
        atomic_write_text(args.markdown, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
