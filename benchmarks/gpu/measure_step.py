#!/usr/bin/env python3
"""Measure training steps of small Llama-style decoders on one device (benchmarks/gpu/README.md).

Writes step.csv (atomically) into --out: per configuration, the median step time, its forward / backward /
optimizer split, and torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps, so that
compare.py can hold planner.cost.estimate against them.

The model is plain torch: token embedding, `layers` blocks of [RMSNorm, GQA attention with rotary
embeddings through scaled_dot_product_attention (causal), RMSNorm, SwiGLU MLP], a final RMSNorm and an
untied LM head; no biases, no dropout (the Llama recipe, Touvron et al. 2023, arXiv:2302.13971 section 2.2).

Precision recipe: fp32 parameters, torch.autocast(bfloat16) around forward and loss, fp32 gradients,
torch.optim.AdamW (fused on CUDA). This is PyTorch's standard automatic mixed precision recipe
(pytorch.org/docs/stable/amp.html; bf16 needs no GradScaler). Bytes per parameter: 4 weights + 4 grads + 8
Adam moments = 16, plus the bf16 copies autocast caches during forward (2): the planner's mixed-precision
AdamW count with fp32 grads (bf16 weights 2 + fp32 grads 4 + fp32 master and moments 12 = 18) holds the
same total at the peak.

Activation checkpointing ("full"): every block runs under torch.utils.checkpoint.checkpoint
(use_reentrant=False), keeping only its input, as Megatron's --recompute-granularity full
--recompute-method uniform does.

Depends on torch and the standard library only. Without CUDA it runs tiny configurations on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class StepConfig:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    mbs: int
    checkpoint: bool = False
    rope: bool = True


# Llama-style shapes near the GPT-3 small / medium / XL sizes (Brown et al. 2020, Table 2.1), SwiGLU widths
# at 8/3 h rounded to 256 (Llama), a 32000-token vocabulary (Llama 2).
M125 = dict(layers=12, hidden=768, heads=12, kv_heads=12, ffn=2048, vocab=32000)
M350 = dict(layers=24, hidden=1024, heads=16, kv_heads=16, ffn=2816, vocab=32000)
M1300 = dict(layers=24, hidden=2048, heads=16, kv_heads=8, ffn=5632, vocab=32000)

FULL_CONFIGS = [
    StepConfig("125m", **M125, seq=2048, mbs=8),
    StepConfig("125m", **M125, seq=2048, mbs=8, checkpoint=True),
    StepConfig("125m", **M125, seq=4096, mbs=4),
    StepConfig("350m", **M350, seq=2048, mbs=4),
    StepConfig("350m", **M350, seq=2048, mbs=8, checkpoint=True),
    StepConfig("350m", **M350, seq=4096, mbs=2),
    StepConfig("1.3b", **M1300, seq=2048, mbs=1),
    StepConfig("1.3b", **M1300, seq=2048, mbs=4),
    StepConfig("1.3b", **M1300, seq=2048, mbs=8, checkpoint=True),
    StepConfig("1.3b", **M1300, seq=4096, mbs=1),
    StepConfig("1.3b", **M1300, seq=4096, mbs=2, checkpoint=True),
]
QUICK_CONFIGS = [
    StepConfig("125m", **M125, seq=2048, mbs=2),
    StepConfig("125m", **M125, seq=2048, mbs=2, checkpoint=True),
    StepConfig("1.3b", **M1300, seq=2048, mbs=1),
]
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256)
CPU_CONFIGS = [
    StepConfig("tiny", **TINY, seq=64, mbs=2),
    StepConfig("tiny", **TINY, seq=64, mbs=2, checkpoint=True),
]

COLUMNS = ["name", "layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq", "mbs", "checkpoint", "rope",
           "params", "status", "steps", "step_time_s", "wall_step_time_s", "fwd_s", "bwd_s", "opt_s",
           "tokens_per_s", "peak_allocated_bytes", "peak_reserved_bytes", "model_state_bytes", "device",
           "precision"]
PRECISION = "autocast-bf16/fp32-params/adamw"


# ----------------------------------------------------------------------------------------------------
# model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def rotary_tables(seq: int, head_dim: int, device, theta: float = 10000.0):
    """cos and sin of shape (seq, head_dim/2) (Su et al. 2021, RoFormer; the rotate-half layout of Llama in HF)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


_GQA_NATIVE: bool | None = None


def sdpa_gqa(q, k, v):
    """Causal SDPA with fewer kv heads: torch's enable_gqa where it has it, else repeat the kv heads."""
    global _GQA_NATIVE
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if _GQA_NATIVE is not False:
        try:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            _GQA_NATIVE = True
            return out
        except (TypeError, RuntimeError):
            _GQA_NATIVE = False
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          is_causal=True)


class Block(nn.Module):
    def __init__(self, c: StepConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.hidden // c.heads
        self.attn_norm = RMSNorm(c.hidden)
        self.wqkv = nn.Linear(c.hidden, (c.heads + 2 * c.kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(c.heads * self.head_dim, c.hidden, bias=False)
        self.mlp_norm = RMSNorm(c.hidden)
        self.w_gate_up = nn.Linear(c.hidden, 2 * c.ffn, bias=False)
        self.w_down = nn.Linear(c.ffn, c.hidden, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        hd = self.head_dim
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(b, s, self.heads, hd).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, hd).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, hd).transpose(1, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = sdpa_gqa(q, k, v).transpose(1, 2).reshape(b, s, self.heads * hd)
        x = x + self.wo(a)
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, c: StepConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets, cos, sin):
        x = self.embed(tokens)
        for blk in self.blocks:
            if self.c.checkpoint and self.training:
                x = checkpoint(blk, x, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


# ----------------------------------------------------------------------------------------------------
# measurement

def measure(c: StepConfig, device: torch.device, steps: int, warmup: int) -> dict:
    cuda = device.type == "cuda"
    row = {**asdict(c), "checkpoint": int(c.checkpoint), "rope": int(c.rope), "device": device.type,
           "precision": PRECISION + ("-fused" if cuda else ""), "steps": steps}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = opt = None
    try:
        with device:  # initialise on the device: a CPU init of 1.3B parameters takes ~20 s
            model = Decoder(c)
        row["params"] = sum(p.numel() for p in model.parameters())
        kw = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **kw)
        cos, sin = rotary_tables(c.seq, c.hidden // c.heads, device) if c.rope else (None, None)
        tokens = torch.randint(0, c.vocab, (c.mbs, c.seq), device=device)
        targets = torch.randint(0, c.vocab, (c.mbs, c.seq), device=device)
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

        def now():
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                return e
            return time.perf_counter()

        def step():
            marks = [now()]
            with amp:
                loss = model(tokens, targets, cos, sin)
            marks.append(now())
            loss.backward()
            marks.append(now())
            opt.step()
            opt.zero_grad(set_to_none=True)
            marks.append(now())
            return marks

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            row["model_state_bytes"] = torch.cuda.memory_allocated(device)  # weights + Adam moments (grads freed)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        all_marks = [step() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / steps

        def dt(a, b):
            return a.elapsed_time(b) * 1e-3 if cuda else b - a

        split = [[dt(m[i], m[i + 1]) for i in range(3)] for m in all_marks]
        step_s = statistics.median(sum(s) for s in split)
        row.update(status="ok", step_time_s=step_s, wall_step_time_s=wall,
                   fwd_s=statistics.median(s[0] for s in split), bwd_s=statistics.median(s[1] for s in split),
                   opt_s=statistics.median(s[2] for s in split), tokens_per_s=c.mbs * c.seq / step_s)
        if cuda:
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        else:
            # no allocator statistics on the CPU: count what the step must hold (weights, grads, Adam)
            state = sum(p.numel() * p.element_size() * 4 for p in model.parameters())
            row["peak_allocated_bytes"] = row["peak_reserved_bytes"] = row["model_state_bytes"] = state
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    finally:
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return row


def parse_custom(spec: str) -> StepConfig:
    """'layers=2,hidden=64,heads=4,kv_heads=2,ffn=128,vocab=256,seq=64,mbs=2[,checkpoint=1][,rope=0]'."""
    fields = {"name": "custom", **TINY, "seq": 64, "mbs": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, val = part.partition("=")
        if key not in StepConfig.__dataclass_fields__:
            raise SystemExit(f"error: --custom: unknown field '{key}'")
        fields[key] = val if key == "name" else (bool(int(val)) if key in ("checkpoint", "rope") else int(val))
    c = StepConfig(**fields)
    if c.hidden % c.heads or c.heads % c.kv_heads:
        raise SystemExit("error: --custom: hidden must divide by heads and heads by kv_heads")
    return c


def atomic_write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for step.csv")
    ap.add_argument("--quick", action="store_true", help="a few small configurations, few steps")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 8, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 1)")
    ap.add_argument("--custom", action="append", default=[],
                    help="run this configuration instead, e.g. layers=4,hidden=512,heads=8,kv_heads=8,"
                         "ffn=1408,vocab=32000,seq=1024,mbs=2,checkpoint=1 (repeatable)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    else:
        device = torch.device(args.device)
    steps = args.steps or (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.custom:
        configs = [parse_custom(s) for s in args.custom]
    elif device.type != "cuda":
        print("measure_step: no CUDA device, running tiny CPU configurations (for testing the script only)",
              file=sys.stderr)
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        configs = CPU_CONFIGS
    else:
        configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    rows = []
    t_all = time.perf_counter()
    for c in configs:
        t = time.perf_counter()
        row = measure(c, device, steps, warmup)
        rows.append(row)
        if row["status"] == "ok":
            print(f"step {c.name:6s} L{c.layers} h{c.hidden} seq {c.seq} mbs {c.mbs} ckpt {int(c.checkpoint)}: "
                  f"{row['params'] / 1e6:.0f}M params, step {row['step_time_s'] * 1e3:.1f} ms "
                  f"(fwd {row['fwd_s'] * 1e3:.1f} bwd {row['bwd_s'] * 1e3:.1f} opt {row['opt_s'] * 1e3:.1f}), "
                  f"peak alloc {row['peak_allocated_bytes'] / 2**30:.2f} GiB, "
                  f"reserved {row['peak_reserved_bytes'] / 2**30:.2f} GiB [{time.perf_counter() - t:.1f} s]",
                  flush=True)
        else:
            print(f"step {c.name} seq {c.seq} mbs {c.mbs} ckpt {int(c.checkpoint)}: {row['status']}", flush=True)
        atomic_write_csv(args.out / "step.csv", rows)  # after every configuration: a crash keeps the rest
    print(f"wrote {args.out / 'step.csv'} ({len(rows)} rows) in {time.perf_counter() - t_all:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
