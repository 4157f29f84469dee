"""The one check validate and calibrate share: they run the torch backend (planner/backends/torch/), which
is imported only when one of them is asked for, so the rest of the command line works without torch."""
from __future__ import annotations

from planner.core.errors import BadInput


def require_torch(args) -> None:
    if args.backend != "torch":
        raise BadInput(f"unknown backend '{args.backend}'; the only backend is 'torch'")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BadInput("the torch backend needs torch: pip install torch==2.13.0 (the CPU wheel is enough)") from None
