"""Tasks: deterministic data with disjoint splits, a DSPy program for them, and their metric."""
