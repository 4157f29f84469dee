"""Execution backends: run a ParallelPlan for real and measure it (DESIGN.md section 3, `validate`)."""
