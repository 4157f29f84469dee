"""Heterogeneous clusters: per-stage device layouts (stages.py). The planners that use them live in
planner/search/hetero.py (device groups, uneven stages, unequal batch shares), planner/search/ilp.py (NIC-aware
placement) and planner/cost/edge.py (phones: sub-models and the CPU/GPU split)."""
