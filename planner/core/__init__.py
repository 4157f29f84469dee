"""The planning vocabulary as plain typed data: errors, hardware, model graph, plan, workload, limits.
Imports nothing else of the package (docs/ARCHITECTURE.md)."""
