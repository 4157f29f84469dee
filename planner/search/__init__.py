"""Search: enumerate, prune and rank parallel plans (issue 5)."""
