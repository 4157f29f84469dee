"""Backtest: predict every row of a published-runs table and compare with what was measured.

The table has the columns of reference calibration_runs_clean.csv. The model is built from the row's own
columns (never looked up by name), so any file with those columns works. Settings a source does not print
(micro-batch, recompute, ZeRO stage) are searched: the fastest setting that fits, which is what a tuned
vendor recipe is; the row says which values were assumed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from planner.builders import MoEConfig, TransformerConfig, build_transformer
from planner.catalog import load_cluster, stack_efficiency
from planner.cost.estimate import estimate
from planner.errors import BadInput, PlannerError
from planner.model import MLA
from planner.plan import Estimate, ParallelPlan, Workload

REQUIRED_COLUMNS = ["id", "source_code", "arch", "layers", "hidden", "heads", "ffn_hidden", "seq_len",
                    "device", "device_count", "cluster", "gpus_per_node", "tp", "pp", "global_batch",
                    "target", "usable"]
TARGETS = {"step_time": "measured_step_time_s", "tokens_per_s": "measured_tokens_per_s_per_device",
           "tflops": "measured_tflops_per_device", "mfu": "measured_mfu_pct", "hfu": "measured_hfu_pct"}
# What each source's software stack does that its table does not print. Unknown sources get a current
# stack (FlashAttention, overlapped gradient reduction). Megatron-LM of 2021-22 had neither FlashAttention
# (Dao et al. 2022 came later) nor overlapped reduction (Korthikanti 2022 section 6.3 says so);
# NeMo/Megatron-Bridge recipes turn on overlap_grad_reduce with the distributed optimizer.
SOFTWARE_STACKS = {
    "NAR21": {"flash_attention": False, "overlap_grad_reduce": False},
    "KOR22": {"flash_attention": False, "overlap_grad_reduce": False},
    # vTrain's ground truth ran Megatron-DeepSpeed, whose --use-flash-attn is off by default.
    "VTRAIN-SINGLE": {"flash_attention": False, "overlap_grad_reduce": False},
}
MODERN_STACK = {"flash_attention": True, "overlap_grad_reduce": True}
# NeMo / Megatron-Bridge performance recipes also overlap TP communication with GEMMs (tp_comm_overlap,
# Transformer Engine userbuffers); torchtitan does only with async TP, and XLA (MaxText) not by default.
for _src in ("NEMO-24.07", "MBRIDGE-25.09"):
    SOFTWARE_STACKS[_src] = {**MODERN_STACK, "overlap_tp_comm": True}


def stack_key(row: dict) -> str:
    """The software stack a row ran on, as fitted efficiencies are keyed: its source, and "<source>/zero3"
    for a source's ZeRO-3 rows, which run a different data-parallel engine (NAR21's ZeRO-3 baseline is
    DeepSpeed, its 3D rows Megatron-LM) and so get their own collective efficiency."""
    src = str(row["source_code"])
    zero = _num(row, "zero")
    return f"{src}/zero3" if zero is not None and int(zero) == 3 else src
DEFAULT_VOCAB = 51200  # GPT-3-style runs that do not print one (NeMo GPT3 recipes pad 50257 to this)


def _num(row, key, default=None):
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return default
    return v


@dataclass
class RowResult:
    id: str
    source_code: str
    target: str
    measured: float | None = None
    predicted: float | None = None
    error_pct: float | None = None
    status: str = "ok"
    reason: str = ""
    assumed: dict = field(default_factory=dict)
    plan: ParallelPlan | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "source_code", "target", "measured", "predicted",
                                             "error_pct", "status", "reason", "assumed")}


def row_model(row: dict):
    """The row's model, built from its columns; a head_dim the row's own FLOP count contradicts is
    replaced (see `head_dim_correction`)."""
    fix = head_dim_correction(row)
    return _build_row_model({**row, **fix}) if fix else _build_row_model(row)


def _model_flops_per_token(row: dict) -> float:
    """Model FLOPs per token (forward + backward = 3 x forward, no recompute) of the row's model."""
    model = _build_row_model(row)
    s = int(row["seq_len"])
    return 3 * sum(float(layer.flops_fwd(1, s)) for layer in model.layers) / s


def head_dim_correction(row: dict) -> dict:
    """{"head_dim": d} when the row's head_dim looks derived (= hidden / heads) but the FLOPs per token
    the source itself printed (model TFLOP/s over tokens/s) only agree with another standard head size.

    Qwen3 decouples head_dim (128) from hidden / heads (64); a table that derives it halves the attention
    FLOPs. The source's printed model-FLOPs rate is its own count of the same model, so where it agrees
    within 3% with head_dim 128 or 256 and is >10% off the printed value, the printed value is the typo.
    """
    hd = _num(row, "head_dim")
    tflops, tokens = _num(row, "measured_tflops_per_device"), _num(row, "measured_tokens_per_s_per_device")
    if (hd is None or tflops is None or tokens is None or str(row.get("flops_convention")) != "model"
            or int(hd) * int(row["heads"]) != int(row["hidden"]) or str(row["arch"]).startswith("deepseek")):
        return {}
    printed = float(tflops) * 1e12 / float(tokens)

    def off(d):
        return abs(printed / _model_flops_per_token({**row, "head_dim": d}) - 1)

    if off(hd) <= 0.10:
        return {}
    best = min((128, 256), key=off)
    return {"head_dim": best} if best != int(hd) and off(best) <= 0.03 else {}


def _build_row_model(row: dict):
    arch = str(row["arch"])
    gpt = arch == "gpt"
    hidden, heads = int(row["hidden"]), int(row["heads"])
    kv = int(_num(row, "kv_heads", heads))
    head_dim = _num(row, "head_dim")
    moe = None
    mla = None
    experts = _num(row, "moe_experts")
    if experts:
        moe = MoEConfig(experts=int(experts), topk=int(_num(row, "moe_topk", 2)),
                        ffn_hidden=int(_num(row, "moe_ffn_hidden", row["ffn_hidden"])),
                        shared_experts=int(_num(row, "moe_shared_experts", 0)),
                        shared_ffn_hidden=int(_num(row, "moe_ffn_hidden", 0)) * int(
                            _num(row, "moe_shared_experts", 0) > 0),
                        dense_layers_first=int(_num(row, "dense_layers_first", 0)))
    if arch.startswith("deepseek"):
        # DeepSeek-V3's MLA dimensions (DeepSeek-V3 technical report section 4.2)
        mla = MLA(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128)
        kv = heads
    gated = bool(int(_num(row, "gated_mlp", 0 if gpt else 1)))
    cfg = TransformerConfig(
        name=str(row.get("model", row["id"])), source=f"row {row['id']} of a runs table",
        layers=int(row["layers"]), hidden=hidden, heads=heads, kv_heads=kv,
        head_dim=int(head_dim) if head_dim and not mla else None,
        ffn_hidden=int(row["ffn_hidden"]), vocab=int(_num(row, "vocab", DEFAULT_VOCAB)), gated_mlp=gated,
        norm="layernorm" if gpt else "rmsnorm", position="learned" if gpt else "rope",
        max_seq=int(row["seq_len"]), bias=gpt, dropout=gpt and str(row["source_code"]) in ("NAR21", "KOR22"),
        moe=moe, mla=mla)
    return build_transformer(cfg)


def token_drop(row: dict) -> bool:
    """Whether the run drops tokens at a capacity factor (its notes or model name say token-drop; Megatron-
    Bridge's token-drop recipes use capacity factor 1.0 with padding, apply_moe_token_drop)."""
    text = f"{row.get('model', '')} {row.get('notes', '')}".lower()
    return "token-drop" in text or "tokendrop" in text


def _candidates(row: dict, n_devices: int):
    """Plans for the row: printed values fixed, unprinted ones enumerated."""
    tp = int(_num(row, "tp", 1))
    pp = int(_num(row, "pp", 1))
    cp = int(_num(row, "cp", 1))
    dp = int(_num(row, "dp", n_devices // (tp * pp * cp)))
    vpp = int(_num(row, "vpp", 1))
    ep = int(_num(row, "ep", 1))
    etp_printed = _num(row, "etp")
    # Unprinted expert-tensor parallelism: Megatron's default (= tp) or none (1, the MoE-folding recipes);
    # the search keeps whichever is valid and faster.
    etp_opts = [int(etp_printed)] if etp_printed else sorted({tp, 1}) if ep > 1 else [None]
    gbs = int(row["global_batch"])
    mbs_printed = _num(row, "micro_batch")
    mbs_opts = [int(mbs_printed)] if mbs_printed else [x for x in (1, 2, 4, 8) if gbs % (x * dp) == 0]
    rec = str(_num(row, "recompute", "unknown"))
    rec_opts = [rec] if rec in ("none", "selective", "full") else ["none", "selective", "full"]
    zero_printed = _num(row, "zero")
    zero_opts = [int(zero_printed)] if zero_printed is not None else [0, 1]
    sp_printed = _num(row, "sp")
    sp_opts = [bool(int(sp_printed))] if sp_printed is not None else [tp > 1]
    stack = SOFTWARE_STACKS.get(str(row["source_code"]), MODERN_STACK)
    # Unprinted MoE token exchange: the all-to-all, or DeepEP's (dropless routing only, estimate._check_deepep)
    dispatch_opts = ["a2a", "deepep"] if ep > 1 and not token_drop(row) else ["a2a"]
    # An unprinted recompute may also be Megatron's partial one: N blocks of each chunk recomputed.
    per_chunk = -(-int(row["layers"]) // (pp * vpp))
    rec_opts = [(r, None) for r in rec_opts]
    if len(rec_opts) > 1:
        rec_opts += [("full", k) for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if k < per_chunk]
    for mbs, etp, dispatch in ((x, y, z) for x in mbs_opts for y in etp_opts for z in dispatch_opts):
        for recompute, num_layers in rec_opts:
            for zero in zero_opts:
                for sp in sp_opts:
                    assumed = {"micro_batch": mbs if not mbs_printed else None,
                               "etp": etp if (ep > 1 and not etp_printed) else None,
                               "recompute": recompute if len(rec_opts) > 1 else None,
                               "recompute_num_layers": num_layers,
                               "zero": zero if zero_printed is None else None,
                               "sp": sp if sp_printed is None else None,
                               "moe_dispatch": dispatch if len(dispatch_opts) > 1 else None}
                    yield ParallelPlan(
                        dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, vpp=vpp, zero=zero, sp=sp and tp > 1, mbs=mbs,
                        recompute=recompute, recompute_num_layers=num_layers, moe_dispatch=dispatch, **stack,
                        schedule="interleaved-1f1b" if vpp > 1 else "1f1b"), {
                        k: v for k, v in assumed.items() if v is not None}


def predicted_value(target: str, est: Estimate, row: dict, n_devices: int) -> float:
    if target == "step_time":
        return est.step_time_s
    if target == "tokens_per_s":
        return est.tokens_per_s / n_devices
    if target in ("tflops", "mfu", "hfu"):
        mfu = est.hfu if (target == "hfu" or row.get("flops_convention") == "hardware") else est.mfu
        if target == "tflops":
            return mfu * _peak_tflops(row)
        return 100 * mfu
    raise BadInput(f"row {row['id']}: unknown target '{target}'")


def _peak_tflops(row) -> float:
    from planner.catalog import device

    dev = device(str(row["device"]))
    dtype = str(_num(row, "precision", "bf16"))
    return dev.peak_flops("bf16" if dtype in ("unknown", "fp8") else dtype) / 1e12


def backtest_row(row: dict, return_plan: bool = False) -> RowResult:
    res = RowResult(id=str(row["id"]), source_code=str(row["source_code"]), target=str(row["target"]))
    if int(_num(row, "usable", 1)) == 0:
        res.status, res.reason = "skipped", f"unusable: {row.get('unusable_reason', '')}"
        return res
    measured_col = TARGETS.get(res.target)
    if measured_col is None or _num(row, measured_col) is None:
        res.status, res.reason = "skipped", f"no measured value for target '{res.target}'"
        return res
    res.measured = float(row[measured_col])
    try:
        model = row_model(row)
        res.assumed.update(head_dim_correction(row))
        n_devices = int(row["device_count"])
        per_node = int(_num(row, "gpus_per_node", 8))
        cluster = load_cluster(str(row["cluster"]), nodes=max(1, n_devices // per_node),
                               devices=n_devices if n_devices < per_node else None)
        # A source whose software stack was fitted on its own (planner.fit --stack) uses that fit.
        cluster = cluster.with_efficiency(**stack_efficiency(stack_key(row), str(row["device"])))
        if cluster.device_count != n_devices:
            raise BadInput(f"cluster {row['cluster']} x {n_devices // per_node} nodes has "
                           f"{cluster.device_count} devices, row says {n_devices}")
        precision = str(_num(row, "precision", "bf16"))
        workload = Workload(global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                            dtype=precision if precision in ("bf16", "fp16", "fp8", "fp32") else "bf16",
                            moe_capacity_factor=1.0 if token_drop(row) else None)
        best = None
        for plan, assumed in _candidates(row, n_devices):
            try:
                est = estimate(model, cluster, workload, plan)
            except BadInput:
                continue
            key = (not est.fits, est.step_time_s)
            if best is None or key < best[0]:
                best = (key, est, assumed, plan)
        if best is None:
            raise BadInput("no candidate plan is valid for this row")
        _, est, assumed, plan = best
        res.assumed = {**res.assumed, **assumed}
        if return_plan:
            res.plan = plan
        res.predicted = predicted_value(res.target, est, row, n_devices)
        res.error_pct = 100 * (res.predicted - res.measured) / res.measured
        if not est.fits:
            res.reason = "predicted not to fit in memory"
    except PlannerError as e:
        res.status, res.reason = "skipped", str(e)
    return res


def read_runs(path: str | Path):
    """A runs table as a DataFrame; BadInput for a missing or broken file or missing columns."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise BadInput(f"{path}: cannot read as CSV ({e.__class__.__name__}: {e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise BadInput(f"{path}: missing columns {', '.join(missing)} (see calibration_runs_clean.csv)")
    return df


def run_backtest(path: str | Path) -> dict:
    df = read_runs(path)
    from tqdm import tqdm

    # a progress bar on stderr when it is a terminal (tqdm's disable=None), silent in pipes and CI
    records = df.to_dict(orient="records")
    rows = [backtest_row(r) for r in tqdm(records, desc="backtest", unit="row", disable=None, leave=False)]
    ok = [r for r in rows if r.status == "ok"]
    usable = [r for r in rows if not r.reason.startswith("unusable")]
    by_source: dict[str, list[float]] = {}
    for r in ok:
        by_source.setdefault(r.source_code, []).append(abs(r.error_pct))
    mape = sum(abs(r.error_pct) for r in ok) / len(ok) if ok else float("nan")
    return {
        "rows": [r.as_dict() for r in rows],
        "mape_pct": mape,
        "coverage": len(ok) / len(usable) if usable else 0.0,
        "by_source": {k: sum(v) / len(v) for k, v in sorted(by_source.items())},
    }
