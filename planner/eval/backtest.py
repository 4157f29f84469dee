"""Backtest: predict every row of a published-runs table and compare with what was measured.

The table has the columns of reference calibration_runs_clean.csv. The model is built from the row's own
columns (never looked up by name), so any file with those columns works. Settings a source does not print
(micro-batch, recompute, ZeRO stage) are searched: the fastest setting that fits, which is what a tuned
vendor recipe is; the row says which values were assumed.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from planner.catalog import find_stack, load_cluster, load_stack, stack_efficiency
from planner.core.builders import MoEConfig, TransformerConfig, build_transformer
from planner.core.dtypes import train_dtype_or
from planner.core.errors import BadInput, PlannerError
from planner.core.hardware import Cluster
from planner.core.limits import MAX_GLOBAL_BATCH, MAX_MICROBATCHES, MAX_SEQ_LEN
from planner.core.model import MLA
from planner.core.plan import Estimate, ParallelPlan, Workload
from planner.cost.estimate import estimate
from planner.files import read_input

REQUIRED_COLUMNS = ["id", "source_code", "arch", "layers", "hidden", "heads", "ffn_hidden", "seq_len",
                    "device", "device_count", "cluster", "gpus_per_node", "tp", "pp", "global_batch",
                    "target", "usable"]
TARGETS = {"step_time": "measured_step_time_s", "tokens_per_s": "measured_tokens_per_s_per_device",
           "tflops": "measured_tflops_per_device", "mfu": "measured_mfu_pct", "hfu": "measured_hfu_pct"}
# What a row's software stack does that its table does not print (flash attention, overlapped gradient
# reduction, TP overlap) comes from the stack's profile (hardware_profiles/stacks/, plan_defaults: Megatron-LM
# of 2021-22 has neither FlashAttention nor overlapped reduction, NeMo / Megatron-Bridge recipes overlap both
# and TP communication, ...). A row whose stack has no profile gets a current stack:
MODERN_STACK = {"flash_attention": True, "overlap_grad_reduce": True, "overlap_tp_comm": False}


# The stack of a row whose table has no `stack` column, by its source; the table's own names for a stack that
# the catalog calls otherwise (a ZeRO stage is a plan choice, not a stack).
SOURCE_STACKS = {"NAR21": "megatron-lm-legacy", "KOR22": "megatron-lm-legacy", "VTRAIN-SINGLE": "megatron-deepspeed",
                 "NEMO-24.07": "megatron-core", "MBRIDGE-25.09": "megatron-core", "TITAN-2412": "torchtitan",
                 "MAXTEXT-V5E": "maxtext"}
STACK_ALIASES = {"deepspeed-zero3": "deepspeed"}


def stack_key(row: dict) -> str:
    """The software stack a row ran on, as fitted efficiencies are keyed: the table's `stack` column, else its
    source's stack (NAR21's ZeRO-3 baseline ran DeepSpeed, its 3D rows Megatron-LM), else "unknown"."""
    named = row_value(row, "stack")
    if named:
        return STACK_ALIASES.get(str(named), str(named))
    src = str(row["source_code"])
    zero = row_value(row, "zero")
    if src == "NAR21" and zero is not None and int(zero) == 3:
        return "deepspeed"
    return SOURCE_STACKS.get(src, "unknown")


def stack_plan_defaults(row: dict) -> dict:
    """The plan fields the row's stack decides (its profile's plan_defaults), MODERN_STACK without a profile."""
    profile = find_stack(stack_key(row))
    return profile.plan_defaults.model_dump() if profile is not None else dict(MODERN_STACK)


def with_row_stack(cluster, row: dict):
    """The cluster carrying the row's stack profile (fitted values only: the fit saw these rows), for the
    estimate's error band and explanation. Its efficiencies are left as they are: the backtest takes them
    from `stack_efficiency`, which planner.eval.fit_cases replaces while it judges a fold."""
    profile = find_stack(stack_key(row))
    return cluster if profile is None else cluster.model_copy(update={"stack": load_stack(profile.name, priors=False)})


DEFAULT_VOCAB = 51200  # GPT-3-style runs that do not print one (NeMo GPT3 recipes pad 50257 to this)


def row_value(row, key, default=None):
    """The row's cell under `key`, or `default` where the table leaves it empty (missing, "", NaN)."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return default
    return v


# ---------------------------------------------------------------------------------------------------------
# Reading a runs table: every cell is read as text and checked against its column's rule, row by row, so a
# bad cell costs its own row (skipped, with the column and value named) and never the rest of the table.

# Far above any published table (the two reference tables have 98 and 1,440 rows; one row takes about 4 ms
# to predict, so this many is a run of minutes), small enough that a runaway file is refused at once.
MAX_ROWS = 100_000
# Sane ranges of the size columns: each well above the largest model or cluster published (GPT 1T: 128
# layers, hidden 25,600, 160 heads; DeepSeek-V3: 256 experts; 16k-device clusters) and below what the
# cost model can represent without building absurd objects (one per device, one per micro-batch).
# seq_len, global_batch and micro-batches per step are held to the planner's own caps (planner.core.limits).
MAX_LAYERS = 1_000
MAX_HIDDEN = 2**17
MAX_HEADS = 2**12
MAX_FFN_HIDDEN = 2**20
MAX_VOCAB = 2**24
MAX_EXPERTS = 2**14
# 4x the largest published run (Llama 3 405B on 16,384 H100s, Dubey et al. 2024 section 3.3); the
# cluster model builds one object per device, so a row this size already takes seconds (tighter than
# limits.MAX_DEVICES: a table holds many rows, a plan one cluster).
MAX_ROW_DEVICES = 2**16
MAX_DEVICES_PER_NODE = 1_024
MAX_TOTAL_PARAMS_B = 10**5  # billions of parameters

ARCHES = ("gpt", "llama", "mixtral", "qwen-moe", "deepseek-moe", "other")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32", "unknown")
RECOMPUTES = ("none", "selective", "full", "unknown")
FLOPS_CONVENTIONS = ("model", "hardware", "unknown")
# ASCII digits only: float() also takes other scripts' digits and "1_000", which no table means
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class Col:
    """How one column is read: kind int / float (finite, > 0) / bool (0 or 1) / enum / text (non-empty) /
    free (anything, never read by the model); `required` refuses an empty cell; [lo, hi] is the sane range."""
    kind: str
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()


def _pos_int(hi, required=False):
    return Col("int", required, 1, hi)


COLUMNS: dict[str, Col] = {
    "id": Col("text", True), "source_code": Col("text", True), "model": Col("free"),
    "arch": Col("enum", True, choices=ARCHES),
    "layers": _pos_int(MAX_LAYERS, True), "hidden": _pos_int(MAX_HIDDEN, True), "heads": _pos_int(MAX_HEADS, True),
    "kv_heads": _pos_int(MAX_HEADS), "head_dim": _pos_int(MAX_HEADS * 4), "ffn_hidden": _pos_int(MAX_FFN_HIDDEN),
    "vocab": _pos_int(MAX_VOCAB), "seq_len": _pos_int(MAX_SEQ_LEN, True),
    "moe_experts": _pos_int(MAX_EXPERTS), "moe_topk": _pos_int(MAX_EXPERTS),
    "moe_ffn_hidden": _pos_int(MAX_FFN_HIDDEN), "moe_shared_experts": Col("int", False, 0, MAX_EXPERTS),
    "dense_layers_first": Col("int", False, 0, MAX_LAYERS),
    "total_params_b": Col("float", False, 0, MAX_TOTAL_PARAMS_B), "gated_mlp": Col("bool"),
    "device": Col("text", True), "device_count": _pos_int(MAX_ROW_DEVICES, True), "cluster": Col("text", True),
    "gpus_per_node": _pos_int(MAX_DEVICES_PER_NODE), "precision": Col("enum", choices=PRECISIONS),
    "tp": _pos_int(MAX_ROW_DEVICES), "pp": _pos_int(MAX_ROW_DEVICES), "vpp": _pos_int(MAX_LAYERS),
    "dp": _pos_int(MAX_ROW_DEVICES), "cp": _pos_int(MAX_ROW_DEVICES), "ep": _pos_int(MAX_ROW_DEVICES),
    "etp": _pos_int(MAX_ROW_DEVICES),
    "sp": Col("bool"), "zero": Col("int", False, 0, 3), "micro_batch": _pos_int(MAX_GLOBAL_BATCH),
    "global_batch": _pos_int(MAX_GLOBAL_BATCH, True), "recompute": Col("enum", choices=RECOMPUTES),
    "measured_step_time_s": Col("float"), "measured_tokens_per_s_per_device": Col("float"),
    # a utilisation above 100% of peak is impossible by definition
    "measured_mfu_pct": Col("float", False, 0, 100), "measured_hfu_pct": Col("float", False, 0, 100),
    "measured_tflops_per_device": Col("float"), "flops_convention": Col("enum", choices=FLOPS_CONVENTIONS),
    "target": Col("enum", True, choices=tuple(TARGETS)), "usable": Col("bool"),
    "unusable_reason": Col("free"), "notes": Col("free"), "stack": Col("free"),
}


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_cell(name: str, rule: Col, text: str):
    """The cell's value (None when empty and allowed), or BadInput naming the column and the value."""
    t = text.strip()
    if rule.kind == "free":
        return text
    if t == "":
        if rule.required:
            raise BadInput(f"column '{name}' is empty; it is required")
        return None
    if rule.kind == "text":
        return t
    if rule.kind == "enum":
        if t.lower() not in rule.choices:
            raise BadInput(f"column '{name}' = {_show(t)} is not one of {', '.join(rule.choices)}")
        return t.lower()
    where = f"column '{name}' = {_show(t)}"
    if rule.kind == "bool" and t not in ("0", "1", "0.0", "1.0"):  # "1.0": how pandas writes a 0/1 column
        raise BadInput(f"{where} must be 0 or 1")
    if not _NUMBER.fullmatch(t):
        what = "a finite number" if t.lower().lstrip("+-") in ("nan", "inf", "infinity") else "a number"
        raise BadInput(f"{where} is not {what}")
    if len(t) > 40:  # no sane value needs more digits; int() of thousands of digits is refused by Python
        raise BadInput(f"{where} ({len(t):,} characters) is far outside the column's sane range")
    value = float(t)
    if not math.isfinite(value):
        raise BadInput(f"{where} is not a finite number")
    if rule.kind == "float":
        lo = 0 if rule.lo is None else rule.lo
        if value <= lo or (rule.hi is not None and value > rule.hi):
            rng = f"in ({lo:g}, {rule.hi:g}]" if rule.hi is not None else f"above {lo:g}"
            raise BadInput(f"{where} must be {rng}")
        return value
    # int and bool: a fractional count or degree is refused, never truncated
    if not value.is_integer():
        raise BadInput(f"{where} is not a whole number")
    n = int(t) if _INTEGER.fullmatch(t) else int(value)
    lo, hi = (0, 1) if rule.kind == "bool" else (rule.lo, rule.hi)
    if n < lo or n > hi:
        raise BadInput(f"{where} must be " + ("0 or 1" if rule.kind == "bool" else f"from {lo:,} to {hi:,}"))
    return n


def _cell_text(v) -> str:
    """A cell as text, whatever the caller's row holds (the CSV's text, or pandas' parsed values with NaN
    for an empty cell)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


def parse_row(raw: dict) -> dict:
    """The row with every known column parsed by its rule (None where empty and allowed), unknown columns
    kept as text; BadInput naming the first bad column, its value and what it should be."""
    row = {k: _cell_text(v) for k, v in raw.items() if isinstance(k, str)}
    if row.get("_bad_fields"):
        raise BadInput(row["_bad_fields"])
    if not row.get("id", "").strip():
        raise BadInput("column 'id' is empty; every row needs an id")
    usable = _parse_cell("usable", COLUMNS["usable"], row.get("usable", ""))
    if usable == 0:  # the table says why; its other cells are not read
        return {**row, "usable": 0}
    for name, rule in COLUMNS.items():
        row[name] = _parse_cell(name, rule, row.get(name, ""))
    _check_row(row)
    return row


def _check_row(row: dict) -> None:
    """What the columns must agree on (each rule is one the cost model or Megatron-LM assumes)."""
    from planner.catalog import cluster_names, device, names

    if row["device"] not in names("devices"):
        try:
            device(row["device"])
        except BadInput as e:  # unknown device, with the close names
            raise BadInput(f"column 'device': {e}") from None
    if row["cluster"] not in cluster_names():  # a runs table names catalog clusters, never files
        from planner.core.errors import did_you_mean

        raise BadInput(f"column 'cluster' = {_show(row['cluster'])} is not a cluster of the catalog"
                       f"{did_you_mean(row['cluster'], cluster_names())}; see `profiles list`")
    measured = TARGETS[row["target"]]
    if row[measured] is None:
        raise BadInput(f"column '{measured}' is empty; target '{row['target']}' needs it")
    n = row["device_count"]
    tp, pp, cp = (row[k] or 1 for k in ("tp", "pp", "cp"))
    if row["dp"] is not None and row["dp"] * tp * pp * cp != n:
        raise BadInput(f"dp*tp*pp*cp = {row['dp']}*{tp}*{pp}*{cp} is not device_count {n}")
    if n % (tp * pp * cp):  # dp = N / (tp*pp*cp) (Narayanan et al. 2021 section 2.3) must be whole
        raise BadInput(f"device_count {n} is not divisible by tp*pp*cp = {tp * pp * cp}")
    dp = n // (tp * pp * cp)
    gbs, mbs = row["global_batch"], row["micro_batch"]
    if gbs % (dp * (mbs or 1)):  # each data-parallel rank runs whole micro-batches
        raise BadInput(f"global_batch {gbs} is not divisible by dp*micro_batch = {dp}*{mbs or 1}")
    if gbs // dp > MAX_MICROBATCHES * (mbs or 8):
        raise BadInput(f"global_batch {gbs} makes more than {MAX_MICROBATCHES:,} micro-batches per step")
    if row["pp"] is not None and row["pp"] * (row["vpp"] or 1) > row["layers"]:
        raise BadInput(f"pp*vpp = {row['pp']}*{row['vpp'] or 1} pipeline chunks exceed the {row['layers']} layers")
    if row["ffn_hidden"] is None and row["arch"] != "gpt":  # GPT's MLP is 4h (Radford 2019); others vary
        raise BadInput(f"column 'ffn_hidden' is empty; only a GPT row may leave it out (4 x hidden), "
                       f"give the FFN size of this {row['arch']} row")
    kv = row["kv_heads"]
    if kv is not None and (kv > row["heads"] or row["heads"] % kv):  # GQA groups (Ainslie et al. 2023)
        raise BadInput(f"kv_heads {kv} does not divide heads {row['heads']}")
    if row["moe_experts"] is not None:
        if (row["moe_topk"] or 2) > row["moe_experts"]:
            raise BadInput(f"moe_topk {row['moe_topk'] or 2} exceeds moe_experts {row['moe_experts']}")
        if (row["dense_layers_first"] or 0) >= row["layers"]:
            raise BadInput(f"dense_layers_first {row['dense_layers_first']} leaves no MoE layer of {row['layers']}")


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
    row: dict | None = None  # the row's parsed cells (parse_row), when they passed
    internal_error: bool = False  # skipped because of a bug in the planner, not because of the row

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
    hd = row_value(row, "head_dim")
    tflops, tokens = row_value(row, "measured_tflops_per_device"), row_value(row, "measured_tokens_per_s_per_device")
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
    ffn = int(row_value(row, "ffn_hidden", 4 * hidden))  # empty only on GPT rows (_check_row): 4h
    kv = int(row_value(row, "kv_heads", heads))
    head_dim = row_value(row, "head_dim")
    moe = None
    mla = None
    experts = row_value(row, "moe_experts")
    if experts:
        moe = MoEConfig(experts=int(experts), topk=int(row_value(row, "moe_topk", 2)),
                        ffn_hidden=int(row_value(row, "moe_ffn_hidden", ffn)),
                        shared_experts=int(row_value(row, "moe_shared_experts", 0)),
                        shared_ffn_hidden=int(row_value(row, "moe_ffn_hidden", 0)) * int(
                            row_value(row, "moe_shared_experts", 0) > 0),
                        dense_layers_first=int(row_value(row, "dense_layers_first", 0)))
    if arch.startswith("deepseek"):
        # DeepSeek-V3's MLA dimensions (DeepSeek-V3 technical report section 4.2)
        mla = MLA(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128)
        kv = heads
    gated = bool(int(row_value(row, "gated_mlp", 0 if gpt else 1)))
    cfg = TransformerConfig(
        name=str(row.get("model") or row["id"]), source=f"row {row['id']} of a runs table",
        layers=int(row["layers"]), hidden=hidden, heads=heads, kv_heads=kv,
        head_dim=int(head_dim) if head_dim and not mla else None,
        ffn_hidden=ffn, vocab=int(row_value(row, "vocab", DEFAULT_VOCAB)), gated_mlp=gated,
        norm="layernorm" if gpt else "rmsnorm", position="learned" if gpt else "rope",
        max_seq=int(row["seq_len"]), bias=gpt, dropout=gpt and str(row["source_code"]) in ("NAR21", "KOR22"),
        moe=moe, mla=mla)
    return build_transformer(cfg)


def token_drop(row: dict) -> bool:
    """Whether the run drops tokens at a capacity factor (its notes or model name say token-drop; Megatron-
    Bridge's token-drop recipes use capacity factor 1.0 with padding, apply_moe_token_drop)."""
    text = f"{row.get('model') or ''} {row.get('notes') or ''}".lower()
    return "token-drop" in text or "tokendrop" in text


# "interleaved" in a row's notes, not "no interleaving" / "non-interleaved" / "not interleaved"
_INTERLEAVED_NOTE = re.compile(r"(?<!non-)(?<!not )(?<!no )\binterleaved\b", re.IGNORECASE)


def vpp_options(row: dict) -> list[tuple[int, dict]]:
    """(vpp, what is assumed) for the row: a printed vpp as printed; else 1 and every v > 1 that divides the
    layers per stage (rounded up: Megatron-Core and torchtitan run a shorter last stage), only the v > 1 when
    the notes say the schedule was interleaved. vpp > 1 runs interleaved 1F1B, vpp 1 runs 1F1B (the schedules
    Megatron runs; ZB and GPipe are never a recipe's unprinted default)."""
    printed = row_value(row, "vpp")
    if printed is not None:
        return [(int(printed), {})]
    pp = int(row_value(row, "pp", 1))
    per_stage = -(-int(row["layers"]) // pp)
    chunks = [v for v in range(2, per_stage + 1) if per_stage % v == 0] if pp > 1 else []
    if _INTERLEAVED_NOTE.search(str(row.get("notes") or "")) and pp > 1:
        if not chunks:
            raise BadInput(f"the notes say interleaved, but {per_stage} layer(s) per stage of pp {pp} leave "
                           "no vpp > 1; print vpp or correct the notes")
        return [(v, {"vpp": v}) for v in chunks]
    return [(1, {"vpp": 1} if chunks else {})] + [(v, {"vpp": v}) for v in chunks]


def _candidates(row: dict, n_devices: int):
    """Plans for the row, as ParallelPlan fields: printed values fixed, unprinted ones enumerated (a field
    combination the plan refuses is the caller's to skip)."""
    for vpp, vpp_assumed in vpp_options(row):
        for fields, assumed in _candidates_at(row, n_devices, vpp):
            yield fields, {**vpp_assumed, **assumed}


def _candidates_at(row: dict, n_devices: int, vpp: int):
    """_candidates at one vpp."""
    tp = int(row_value(row, "tp", 1))
    pp = int(row_value(row, "pp", 1))
    cp = int(row_value(row, "cp", 1))
    dp = int(row_value(row, "dp", n_devices // (tp * pp * cp)))
    ep = int(row_value(row, "ep", 1))
    etp_printed = row_value(row, "etp")
    # Unprinted expert-tensor parallelism: Megatron's default (= tp) or none (1, the MoE-folding recipes);
    # the search keeps whichever is valid and faster.
    etp_opts = [int(etp_printed)] if etp_printed else sorted({tp, 1}) if ep > 1 else [None]
    gbs = int(row["global_batch"])
    mbs_printed = row_value(row, "micro_batch")
    mbs_opts = [int(mbs_printed)] if mbs_printed else [
        x for x in (1, 2, 4, 8) if gbs % (x * dp) == 0 and gbs // (x * dp) <= MAX_MICROBATCHES]
    rec = str(row_value(row, "recompute", "unknown"))
    rec_opts = [rec] if rec in ("none", "selective", "full") else ["none", "selective", "full"]
    zero_printed = row_value(row, "zero")
    zero_opts = [int(zero_printed)] if zero_printed is not None else [0, 1]
    sp_printed = row_value(row, "sp")
    sp_opts = [bool(int(sp_printed))] if sp_printed is not None else [tp > 1]
    stack = stack_plan_defaults(row)
    # Unprinted MoE token exchange: the all-to-all, or DeepEP's (dropless routing only, estimate.check_deepep)
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
                    yield dict(
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
    """The peak per device that the estimate's MFU divides by: the row's device at the precision it ran
    (Workload.dtype). MFU x this is model FLOPs per second per device whatever the precision, which is what a
    TFLOP/s column counts (an fp8 run's TFLOP/s counts the same FLOPs as a bf16 one; MFU x the bf16 peak
    halved it on Hopper, whose fp8 peak is twice its bf16 one)."""
    from planner.catalog import device

    dev = device(str(row["device"]))
    return dev.peak_flops(train_dtype_or(str(row_value(row, "precision", "bf16")), "bf16")) / 1e12


def _error_line(e: Exception) -> str:
    """One short line for an error raised while predicting a row (pydantic's first error, not its dump)."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError) and e.errors():
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        text = (f"{where}: " if where else "") + str(err["msg"]).removeprefix("Value error, ")
    else:
        text = str(e) or e.__class__.__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def backtest_row(row: dict, return_plan: bool = False) -> RowResult:
    """Predict one row (CSV text or already parsed values). Never raises for the row's content: a cell that
    breaks its column's rule, or a row the cost model refuses, comes back skipped with the reason; any
    other exception is a bug in the planner and comes back skipped as "internal error: ..."."""
    raw = {k: _cell_text(v) for k, v in row.items() if isinstance(k, str)}
    res = RowResult(id=raw.get("id", "").strip(), source_code=raw.get("source_code", "").strip(),
                    target=raw.get("target", "").strip())
    try:
        typed = parse_row(raw)
    except BadInput as e:
        res.status, res.reason = "skipped", str(e)
        return res
    if typed["usable"] == 0:
        res.status, res.reason = "skipped", f"unusable: {typed.get('unusable_reason', '')}"
        return res
    res.row = typed
    res.measured = typed[TARGETS[typed["target"]]]
    try:
        _predict(typed, res, return_plan)
    except (PlannerError, ValueError) as e:  # the cost model's refusals (pydantic's ValidationError included)
        res.status, res.reason, res.predicted, res.error_pct = "skipped", _error_line(e), None, None
    except Exception as e:  # noqa: BLE001 (a bug: counted and shown, never a traceback that stops the rest)
        res.status, res.predicted, res.error_pct = "skipped", None, None
        res.reason = f"internal error: {e.__class__.__name__}: {_error_line(e)}"
        res.internal_error = True
    return res


def on_device(cluster: Cluster, name: str) -> Cluster:
    """The cluster with every device replaced by the catalog's `name` (nodes, links and NICs kept): a preset
    whose device differs from the one a run used (H200s in HGX H100 chassis) stands for that run's nodes."""
    from planner.catalog import device

    if all(ref.device.name == name for ref in cluster.devices):
        return cluster
    dev = device(name)
    return cluster.model_copy(update={"devices": [ref.model_copy(update={"device": dev}) for ref in cluster.devices]})


def row_cluster(row: dict) -> Cluster:
    """The row's cluster preset at the row's device count, on the row's device (reference README: where the
    two differ, the row's device is the one that ran)."""
    n = int(row["device_count"])
    per_node = int(row_value(row, "gpus_per_node", 8))
    cluster = load_cluster(str(row["cluster"]), nodes=max(1, n // per_node), devices=n if n < per_node else None)
    return on_device(cluster, str(row["device"]))


def _predict(row: dict, res: RowResult, return_plan: bool) -> None:
    model = row_model(row)
    res.assumed.update(head_dim_correction(row))
    n_devices = int(row["device_count"])
    per_node = int(row_value(row, "gpus_per_node", 8))
    cluster = row_cluster(row)
    # A source whose software stack was fitted on its own (planner.eval.fit --stack) uses that fit.
    cluster = with_row_stack(cluster.with_efficiency(**stack_efficiency(stack_key(row), str(row["device"]))), row)
    if cluster.device_count != n_devices:
        raise BadInput(f"cluster {row['cluster']} x {n_devices // per_node} nodes has "
                       f"{cluster.device_count} devices, row says {n_devices}")
    precision = str(row_value(row, "precision", "bf16"))
    workload = Workload(global_batch=int(row["global_batch"]), seq_len=int(row["seq_len"]),
                        dtype=train_dtype_or(precision, "bf16"),
                        moe_capacity_factor=1.0 if token_drop(row) else None)
    best, last_error = None, None
    for fields, assumed in _candidates(row, n_devices):
        try:
            plan = ParallelPlan(**fields)
            est = estimate(model, cluster, workload, plan)
        except (BadInput, ValueError) as e:  # this combination of unprinted settings is not a valid plan
            last_error = e
            continue
        key = (not est.fits, est.step_time_s)
        if best is None or key < best[0]:
            best = (key, est, assumed, plan)
    if best is None:
        why = f": {_error_line(last_error)}" if last_error is not None else ""
        raise BadInput(f"no candidate plan is valid for this row{why}")
    _, est, assumed, plan = best
    res.assumed = {**res.assumed, **assumed}
    if return_plan:
        res.plan = plan
    res.predicted = predicted_value(res.target, est, row, n_devices)
    if not (math.isfinite(res.predicted) and res.predicted > 0):
        raise BadInput(f"the cost model predicted {res.predicted!r} for target '{res.target}'")
    res.error_pct = 100 * (res.predicted - res.measured) / res.measured
    if not math.isfinite(res.error_pct):  # a measured value so small (1e-320) that the ratio overflows
        col = TARGETS[res.target]
        raise BadInput(f"column '{col}' = {res.measured!r} is not a plausible measurement "
                       f"(predicted {res.predicted:.4g})")
    if not est.fits:
        res.reason = "predicted not to fit in memory"


def read_runs(path: str | Path) -> list[dict[str, str]]:
    """The rows of a runs table, every cell as text (a row's cells are checked when it is predicted, so a
    bad cell costs only its row); BadInput (one line) for a file that is not a usable table: missing or
    unreadable (planner.files.read_input), not CSV, no header or no rows, a required column missing, more
    than MAX_ROWS rows, or an id given twice."""
    text = read_input(path, "runs table (CSV)").removeprefix("\ufeff")  # a spreadsheet's byte-order mark
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise BadInput(f"{path}: empty; expected a CSV table whose first line names its columns "
                           f"({', '.join(REQUIRED_COLUMNS[:4])}, ...; see calibration_runs_clean.csv)")
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if h and header.count(h) > 1})
        if dup:
            raise BadInput(f"{path}: column {', '.join(dup)} appears more than once in the header line")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if len(missing) == len(REQUIRED_COLUMNS):
            raise BadInput(f"{path}: not a runs table: its first line names none of the required columns "
                           f"({', '.join(REQUIRED_COLUMNS[:4])}, ...; see calibration_runs_clean.csv)")
        if missing:
            raise BadInput(f"{path}: missing columns {', '.join(missing)} (see calibration_runs_clean.csv)")
        rows, seen = [], {}
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # a blank line
            if len(rows) == MAX_ROWS:
                raise BadInput(f"{path}: more than {MAX_ROWS:,} rows, the most a backtest reads; split the table")
            row = dict(zip(header, fields))
            if len(fields) != len(header):
                # kept, so that the row is reported (skipped) rather than silently misread
                row["_bad_fields"] = f"line {reader.line_num} has {len(fields)} fields, the header has {len(header)}"
            rid = row.get("id", "").strip()
            if rid and rid in seen:
                raise BadInput(f"{path}: id {_show(rid)} is on lines {seen[rid]} and {reader.line_num}; "
                               "ids must be unique")
            seen[rid] = reader.line_num
            rows.append(row)
    except csv.Error as e:
        raise BadInput(f"{path}: not a valid CSV table at line {reader.line_num} ({e})") from None
    if not rows:
        raise BadInput(f"{path}: a header line and no rows; add at least one run")
    return rows


def run_backtest(path: str | Path) -> dict:
    """Every row predicted or skipped with its reason. mape_pct is over the predicted rows (None when there
    are none); coverage is predicted rows / usable rows (rows the table marks usable, whatever their cells)."""
    records = read_runs(path)
    from tqdm import tqdm

    # a progress bar on stderr when it is a terminal (tqdm's disable=None), silent in pipes and CI
    rows = [backtest_row(r) for r in tqdm(records, desc="backtest", unit="row", disable=None, leave=False)]
    ok = [r for r in rows if r.status == "ok"]
    usable = [r for r in rows if not r.reason.startswith("unusable")]
    by_source: dict[str, list[float]] = {}
    for r in ok:
        by_source.setdefault(r.source_code, []).append(abs(r.error_pct))
    return {
        "rows": [r.as_dict() for r in rows],
        "mape_pct": sum(abs(r.error_pct) for r in ok) / len(ok) if ok else None,
        "coverage": len(ok) / len(usable) if usable else 0.0,
        "by_source": {k: sum(v) / len(v) for k, v in sorted(by_source.items())},
        "rows_ok": len(ok),
        "rows_skipped": len(rows) - len(ok),
        "internal_errors": sum(r.internal_error for r in rows),
    }
