"""Planners beyond the homogeneous search: mixed device types (hetero), NIC-aware placement (ilp), phones and
edge boards (edge). Clients of cost/ and search/."""
