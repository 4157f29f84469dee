"""Analytic cost model: pure, numpy-vectorizable time and traffic formulas (reference/formulas.md)."""
