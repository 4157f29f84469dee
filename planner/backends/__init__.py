"""Execution backends: run a ParallelPlan for real and measure it (docs/ARCHITECTURE.md#contracts, `validate`)."""
