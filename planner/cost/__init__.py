"""Analytic cost model: pure, numpy-vectorizable time and traffic formulas (docs/formulas.md)."""
