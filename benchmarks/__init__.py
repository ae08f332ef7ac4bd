"""Benchmarks of asynchrormous against plain Django and the alternatives (issue #8)."""
