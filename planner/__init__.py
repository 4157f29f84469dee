"""Parallelism-strategy planner and cost model for distributed deep-learning training."""

__version__ = "0.1.0"
