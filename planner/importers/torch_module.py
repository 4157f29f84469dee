"""torch.nn.Module -> ModelGraph, traced on the meta device (no weights allocated, no kernels run).

`from_torch_module` runs one forward pass of the module on meta tensors and measures, per unit, what the
analytic layers of planner.core.model compute from dimensions: forward FLOPs (torch.utils.flop_counter: matmuls,
convolutions, attention; norms and pointwise ops are not counted, as in Layer.flops_fwd), parameters,
output bytes (the forward hook's output) and bytes saved for backward (every tensor autograd saves,
seen through torch.autograd.graph.saved_tensors_hooks, counted once per storage, parameters excluded).

Units are the module's top-level children, with containers (ModuleList, ModuleDict, a Sequential of
same-class modules) expanded into their elements, so each transformer block of an nn.ModuleList is its own
layer and carries a `block` index the pipeline partitioner can cut between. Work done in the root's own
forward between units (a tied head's matmul, a loss) becomes a `root.*` layer at its place in execution
order.

Values are measured for a micro-batch of `batch` and scaled linearly in batch. When the inputs are
built from (batch, seq) - token ids by default, a shape with a sequence dimension, or a callable - the
module is traced at three sequence lengths and every per-sample value is fitted exactly as c0 + c1*s +
c2*s^2, so a layer's cost follows the workload's sequence length (the s^2 term is attention). With
fixed example tensors the values are per sample at the traced length and ignore `s`.

The layers are `TracedLayer`s: a Layer subclass of kind "traced" that evaluates the fitted polynomials
(see its docstring for how tp, cp, recompute and flash apply). Torch is imported lazily: this module
imports without it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from planner.core.errors import BadInput
from planner.core.model import Layer, ModelGraph

_INSTALL = "the torch importer needs torch; install the torch extra: pip install torch==2.13.0"

Poly = tuple[float, float, float]


def _import_torch():
    try:
        import torch
        import torch.utils.flop_counter  # noqa: F401
    except ImportError as exc:
        raise BadInput(_INSTALL) from exc
    return torch


def _poly(c: Poly, s):
    return c[0] + c[1] * s + c[2] * s * s


class TracedLayer(Layer):
    """A layer measured from a torch module: per-sample polynomials in the sequence length s.

    flops_poly, saved_poly and output_poly give forward FLOPs, bytes saved for backward and output bytes
    of one sample as c0 + c1*s + c2*s^2 (bytes at trace_dtype_bytes per element; scaled to dtype_bytes).
    With traced_seq None the inputs had no sequence dimension and only c0 is used.

    Parallel splits are assumptions, not measurements: with tensor_parallel, FLOPs, activations and the
    >=2-D parameters (params_matrix) divide by tp, the ideal Megatron split; vectors (norms, biases)
    stay replicated. Context parallel divides the sequence-dependent terms by cp. Selective recompute
    and FlashAttention (flash=True) drop the s^2 saved term (score tensors materialised by the traced
    math attention); full recompute keeps one block input per block (the block's output size).
    """

    kind: Literal["traced"] = "traced"  # type: ignore[assignment]
    traced_batch: int = 1
    traced_seq: int | None = None
    flops_poly: Poly = (0.0, 0.0, 0.0)
    saved_poly: Poly = (0.0, 0.0, 0.0)
    output_poly: Poly = (0.0, 0.0, 0.0)
    trace_dtype_bytes: int = 2
    params_matrix: int = 0
    tensor_parallel: bool = True
    module_type: str = ""

    # parameters ---------------------------------------------------------------------------------
    def params(self) -> int:
        return self.params_fixed

    def active_params(self) -> int:
        return self.params_fixed

    def routed_params(self) -> int:
        return 0

    def params_per_device(self, tp=1, ep=1, etp=None):
        if not self.tensor_parallel:
            return self.params_fixed
        return (self.params_fixed - self.params_matrix) + self.params_matrix / tp

    # compute ------------------------------------------------------------------------------------
    def tokens(self, b, s):
        return b * s if self.traced_seq is not None else b * 1

    def _split(self, b, s, c: Poly, tp, cp):
        """(sequence-independent, linear, quadratic) parts of b * poly(s) on one device."""
        t = tp if self.tensor_parallel else 1
        if self.traced_seq is None:
            return b * c[0] / t, 0 * b, 0 * b
        return b * c[0] / t, b * c[1] * s / (t * cp), b * c[2] * s * s / (t * cp)

    def gemms(self, b, s, tp=1, cp=1):
        """One pseudo-GEMM holding the sequence-independent and linear FLOPs (2*m*n*k of them), m the
        tokens on this device and k the output width; the s^2 part is attention_core_flops."""
        const, lin, _ = self._split(b, s, self.flops_poly, tp, cp)
        m = self.tokens(b, s) / (cp if self.traced_seq is not None else 1)
        return [("traced", m, (const + lin) / (2 * m * self.hidden), self.hidden)]

    def attention_core_flops(self, b, s, tp=1, cp=1):
        return self._split(b, s, self.flops_poly, tp, cp)[2]

    def flops_fwd(self, b, s, tp=1, cp=1):
        const, lin, quad = self._split(b, s, self.flops_poly, tp, cp)
        return const + lin + quad

    # memory -------------------------------------------------------------------------------------
    def output_bytes(self, b, s, cp=1, dtype_bytes=2):
        const, lin, quad = self._split(b, s, self.output_poly, 1, cp)
        return (const + lin + quad) * dtype_bytes / self.trace_dtype_bytes

    def activation_bytes(self, b, s, tp=1, cp=1, sp=False, recompute="none", dtype_bytes=2, flash=True):
        scale = dtype_bytes / self.trace_dtype_bytes
        if recompute == "full":
            if self.block is None:
                return 0 * b
            const, lin, quad = self._split(b, s, self.output_poly, tp if sp else 1, cp)
            return (const + lin + quad) * scale
        const, lin, quad = self._split(b, s, self.saved_poly, tp, cp)
        if recompute == "selective" or flash:
            quad = 0 * b
        return (const + lin + quad) * scale


# ---------------------------------------------------------------------------------------------------
# tracing


def _units(torch, root) -> list[tuple[str, Any, int | None]]:
    """(qualified name, module, block index) of the units, in declaration order."""
    nn = torch.nn
    out: list[tuple[str, Any, int | None]] = []
    counter = [0]

    def is_stack(m) -> bool:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return True
        kids = list(m.children())
        return isinstance(m, nn.Sequential) and len(kids) >= 2 and len({type(k) for k in kids}) == 1

    def visit(prefix: str, m, in_stack: bool):
        for name, child in m.named_children():
            qual = f"{prefix}{name}"
            if is_stack(child):
                visit(qual + ".", child, True)
            elif in_stack:
                out.append((qual, child, counter[0]))
                counter[0] += 1
            else:
                out.append((qual, child, None))

    visit("", root, is_stack(root))  # a root that is itself a stack of blocks gives one unit per block
    return out


def _leaves(x) -> list:
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _leaves(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _leaves(item)]
    return [x]


def _to_meta(torch, x, dtype):
    if isinstance(x, torch.Tensor):
        want = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        if x.device.type == "meta" and x.dtype == want:
            return x
        return torch.empty(x.shape, dtype=want, device="meta").requires_grad_(x.requires_grad)
    if isinstance(x, tuple):
        return tuple(_to_meta(torch, v, dtype) for v in x)
    if isinstance(x, list):
        return [_to_meta(torch, v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: _to_meta(torch, v, dtype) for k, v in x.items()}
    return x


def _trace_once(torch, module, state, units, args, kwargs) -> list[dict]:
    """Run one meta forward; return the segments (units and root glue) in execution order."""
    from torch.utils.flop_counter import FlopCounterMode

    param_storages = {t.untyped_storage()._cdata for t in state.values()}
    segments: list[dict] = []
    seen_storages: set[int] = set()
    calls: dict[str, int] = {}
    keep_alive: list = []

    def new_segment(name, unit, module_=None, block=None):
        seg = dict(name=name, unit=unit, module=module_, block=block, flops=0, saved=0, out=0, out_shape=None)
        segments.append(seg)
        return seg

    stack = [new_segment("root.pre", None)]
    fc = FlopCounterMode(display=False)
    last = [0]

    def flush():
        now = fc.get_total_flops()
        stack[-1]["flops"] += now - last[0]
        last[0] = now

    def output_bytes(out) -> tuple[int, tuple | None]:
        tensors = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors), (tuple(tensors[0].shape) if tensors else None)

    def pre_hook(name, mod, block):
        def hook(_m, _args):
            flush()
            k = calls.get(name, 0) + 1
            calls[name] = k
            stack.append(new_segment(name if k == 1 else f"{name}@{k}", name, mod, block))
        return hook

    def post_hook(name):
        def hook(_m, _args, out):
            flush()
            seg = stack.pop()
            seg["out"], seg["out_shape"] = output_bytes(out)
            if len(stack) == 1:  # back in the root's own code: a fresh glue segment after this unit
                glue = new_segment(f"root.after_{seg['name']}", None)
                glue["out"], glue["out_shape"] = seg["out"], seg["out_shape"]
                stack[0] = glue
        return hook

    def pack(t):
        st = t.untyped_storage()
        key = st._cdata
        if key not in param_storages and key not in seen_storages:
            seen_storages.add(key)
            stack[-1]["saved"] += st.nbytes()
        keep_alive.append(t)  # keep the storage (and so its id) alive for the whole trace
        return t

    handles = []
    for name, mod, block in units:
        handles.append(mod.register_forward_pre_hook(pre_hook(name, mod, block)))
        handles.append(mod.register_forward_hook(post_hook(name)))
    in_bytes, in_shape = output_bytes((args, kwargs))
    stack[0]["out"], stack[0]["out_shape"] = in_bytes, in_shape
    try:
        with torch.device("meta"), torch.enable_grad(), fc, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = torch.func.functional_call(module, state, args, kwargs)
            flush()
    finally:
        for h in handles:
            h.remove()
    del out, keep_alive
    return segments


def _fit(points: list[tuple[int, float]]) -> Poly:
    """Exact polynomial c0 + c1*s + c2*s^2 through up to three (s, value) points."""
    import numpy as np

    s = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(points) >= 3:
        coef = np.linalg.solve(np.vander(s, 3, increasing=True), y)
    elif len(points) == 2:  # no constant term
        coef = np.concatenate([[0.0], np.linalg.solve(np.stack([s, s * s], axis=1), y)])
    else:
        coef = np.array([0.0, y[0] / s[0], 0.0])
    top = max(float(np.max(np.abs(y))), 1.0)
    scale = np.array([1.0, float(s.max()), float(s.max()) ** 2])
    coef = [0.0 if abs(c) * sc < 1e-9 * top else float(c) for c, sc in zip(coef, scale)]
    return (coef[0], coef[1], coef[2])


def _seq_points(seq: int) -> list[int]:
    pts = sorted({seq, max(1, seq // 2), max(1, seq // 4)}, reverse=True)
    k = 1
    while len(pts) < 3 and seq - k >= 1:
        if seq - k not in pts:
            pts.append(seq - k)
        k += 1
    return pts


def from_torch_module(
    module_or_factory,
    example_inputs=None,
    *,
    name: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    seq_dim: int | None = 1,
    dtype="bfloat16",
    causal_attention: bool = False,
    tensor_parallel: bool = True,
    source: str = "",
) -> ModelGraph:
    """Trace a torch.nn.Module on the meta device into a ModelGraph of TracedLayers.

    module_or_factory: an nn.Module (ideally built under `torch.device("meta")`; a module with real
        weights is traced through meta twins of its parameters, nothing is copied) or a zero-argument
        callable returning one, which is called under `torch.device("meta")`.
    example_inputs: what forward receives, as one of
        - None: token ids of shape (batch, seq), int64 (a language model); `seq` is required;
        - a callable (batch, seq) -> tensor | tuple of positional args | dict of keyword args, called
          under the meta device (any module input layout, sequence-scaled);
        - a shape tuple of ints: one floating tensor; dim 0 is the batch and dim `seq_dim` (None: none)
          the sequence, which `batch` and `seq` override;
        - a tensor, tuple or dict of tensors: fixed shapes (moved to meta); values are per sample and do
          not scale with the sequence length.
    batch, seq: the micro-batch traced (defaults 1 and the shape's own); values scale linearly in batch.
    dtype: floating dtype of parameters and floating inputs during the trace (bytes are measured in it
        and rescaled to the planner's dtype_bytes); None keeps the module's own.
    causal_attention: the s^2 FLOP term is causal attention; halve it as the analytic attention layer
        does (FlashAttention skips masked blocks), while the meta trace counts the full QK^T and AV.
    tensor_parallel: assume Megatron-style splits (see TracedLayer); False keeps every unit whole.
    """
    torch = _import_torch()
    nn = torch.nn
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise BadInput(f"unknown torch dtype {dtype!r}")
        dtype = getattr(torch, dtype)

    if isinstance(module_or_factory, nn.Module):
        module = module_or_factory
    elif callable(module_or_factory):
        with torch.device("meta"):
            module = module_or_factory()
        if not isinstance(module, nn.Module):
            raise BadInput(f"the module factory returned {type(module).__name__}, not a torch.nn.Module")
    else:
        raise BadInput(f"expected a torch.nn.Module or a factory returning one, got "
                       f"{type(module_or_factory).__name__}")
    if batch is not None and batch < 1 or seq is not None and seq < 1:
        raise BadInput(f"batch and seq must be positive, got batch={batch} seq={seq}")
    name = name or type(module).__name__

    # Input builder: make(b, s) -> (args, kwargs), and whether the sequence length can vary.
    make: Callable[[int, int | None], tuple[tuple, dict]]
    if example_inputs is None:
        if seq is None:
            raise BadInput("from_torch_module: give seq (token ids of shape (batch, seq) are the default input)")
        batch = batch or 1
        scalable = True

        def make(b, s):
            return (torch.empty((b, s), dtype=torch.long, device="meta"),), {}
    elif isinstance(example_inputs, tuple) and example_inputs and all(isinstance(d, int) for d in example_inputs):
        shape = list(example_inputs)
        if seq_dim is not None and not -len(shape) <= seq_dim < len(shape):
            raise BadInput(f"seq_dim {seq_dim} is out of range for input shape {tuple(shape)}")
        batch = batch or shape[0]
        scalable = seq_dim is not None and seq_dim % len(shape) != 0
        if scalable:
            seq = seq or shape[seq_dim]
        fdt = dtype or torch.get_default_dtype()

        def make(b, s):
            sh = list(shape)
            sh[0] = b
            if scalable:
                sh[seq_dim] = s
            return (torch.empty(sh, dtype=fdt, device="meta"),), {}
    elif callable(example_inputs) and not isinstance(example_inputs, torch.Tensor):
        batch = batch or 1
        scalable = seq is not None

        def make(b, s):
            with torch.device("meta"):
                got = example_inputs(b, s)
            if isinstance(got, dict):
                return (), _to_meta(torch, got, dtype)
            if isinstance(got, tuple):
                return _to_meta(torch, got, dtype), {}
            return (_to_meta(torch, got, dtype),), {}
    else:
        fixed = example_inputs
        if isinstance(fixed, dict):
            fixed_args, fixed_kwargs = (), _to_meta(torch, fixed, dtype)
        elif isinstance(fixed, (tuple, list)):
            fixed_args, fixed_kwargs = tuple(_to_meta(torch, tuple(fixed), dtype)), {}
        else:
            fixed_args, fixed_kwargs = (_to_meta(torch, fixed, dtype),), {}
        first = [t for t in _leaves((fixed_args, fixed_kwargs)) if isinstance(t, torch.Tensor)]
        if not first or first[0].dim() == 0:
            raise BadInput("from_torch_module: example_inputs hold no batched tensor")
        if batch is not None and batch != first[0].shape[0]:
            raise BadInput(f"batch={batch} disagrees with the example inputs' batch {first[0].shape[0]}")
        batch = first[0].shape[0]
        scalable = False

        def make(b, s):
            return fixed_args, fixed_kwargs

    # Meta twins of the parameters and buffers, in the trace dtype; nothing is allocated.
    def twin(t, grad):
        want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        return torch.empty(t.shape, dtype=want, device="meta").requires_grad_(grad)

    state = {n: twin(p, p.requires_grad) for n, p in module.named_parameters(remove_duplicate=False)}
    state.update({n: twin(b, False) for n, b in module.named_buffers(remove_duplicate=False)})

    units = _units(torch, module)
    seqs = _seq_points(seq) if scalable else [seq]
    traces = []
    try:
        for s in seqs:
            args, kwargs = make(batch, s)
            traces.append(_trace_once(torch, module, state, units, args, kwargs))
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - a module that cannot run on meta is a user-facing error
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"tracing {name} on the meta device failed: {type(exc).__name__}: {msg}") from exc
    names = [seg["name"] for seg in traces[0]]
    if any([seg["name"] for seg in tr] != names for tr in traces[1:]):
        raise BadInput(f"tracing {name}: the modules called differ between sequence lengths {seqs}; "
                       "pass fixed example_inputs instead")

    # Parameters: each unique parameter counted once, in the first executed unit that owns it.
    by_unit = {u: m for u, m, _ in units}
    owner_of: dict[int, str] = {}
    order = [seg["unit"] for seg in traces[0] if seg["unit"] is not None]
    order += [u for u, _, _ in units if u not in order]  # units never called keep their parameters
    for u in dict.fromkeys(order):
        for p in by_unit[u].parameters():
            owner_of.setdefault(id(p), u)
    stats: dict[str, list[int]] = {}  # unit or "root" -> [params, matrix params, trainable params]
    for p in module.parameters():
        st = stats.setdefault(owner_of.get(id(p), "root"), [0, 0, 0])
        st[0] += p.numel()
        st[1] += p.numel() if p.dim() >= 2 else 0
        st[2] += p.numel() if p.requires_grad else 0

    trace_bytes = (torch.empty((), dtype=dtype).element_size() if dtype is not None
                   else torch.empty((), dtype=torch.get_default_dtype()).element_size())
    quad_flops_factor = 0.5 if causal_attention else 1.0
    layers: list[Layer] = []
    used_names: set[str] = set()
    first_call: set[str] = set()
    root_params_placed = False

    def fit(key, i):
        pts = [(s if scalable else 1, tr[i][key] / batch) for s, tr in zip(seqs, traces)]
        return _fit(pts) if scalable else (pts[0][1], 0.0, 0.0)

    for i, seg in enumerate(traces[0]):
        unit = seg["unit"]
        if unit is not None and unit not in first_call:
            first_call.add(unit)
            p, pm, pt = stats.get(unit, [0, 0, 0])
        elif unit is None and not root_params_placed and "root" in stats:
            root_params_placed = True
            p, pm, pt = stats["root"]
        else:
            p = pm = pt = 0
        flops, saved, outp = fit("flops", i), fit("saved", i), fit("out", i)
        flops = (flops[0], flops[1], flops[2] * quad_flops_factor)
        if p == 0 and not any(flops) and not any(saved):
            continue  # dropout in eval mode, identity, glue that computes nothing
        shape = seg["out_shape"]
        hidden = int(shape[-1]) if scalable and shape and len(shape) >= 3 else 1
        trainable = pt > 0 if p else any(saved)
        mod = seg["module"]
        layer_name = seg["name"]
        while layer_name in used_names:
            layer_name += "'"
        used_names.add(layer_name)
        layers.append(TracedLayer(
            name=layer_name, trainable=trainable, block=seg["block"], hidden=max(hidden, 1),
            params_fixed=p, params_matrix=pm, traced_batch=batch, traced_seq=seq if scalable else None,
            flops_poly=flops, saved_poly=saved, output_poly=outp, trace_dtype_bytes=trace_bytes,
            tensor_parallel=tensor_parallel, module_type=type(mod).__name__ if mod is not None else "",
            flops_per_sample=_poly(flops, seq) if scalable else flops[0],
            output_elems_per_sample=int(round(_poly(outp, seq) / trace_bytes)) if scalable
            else int(round(outp[0] / trace_bytes))))

    # Units never called in forward keep their weights (root.pre, always first, took the root's own).
    for u, (p, pm, pt) in [(u, stats[u]) for u in order if u not in first_call and u in stats]:
        layers.append(TracedLayer(name=u, trainable=pt > 0, hidden=1, params_fixed=p, params_matrix=pm,
                                  traced_batch=batch, traced_seq=seq if scalable else None,
                                  trace_dtype_bytes=trace_bytes, tensor_parallel=tensor_parallel))
    if not layers:
        raise BadInput(f"tracing {name}: the module has no parameters and computes no FLOPs")
    edges = [(a.name, b.name) for a, b in zip(layers, layers[1:])]
    src = source or f"traced torch module {type(module).__name__} (meta device, batch {batch}, seq {seq})"
    return ModelGraph(name=name, source=src, family="traced", layers=layers, edges=edges,
                      default_seq=seq if scalable else None)
