"""Benchmarks: `python -m bench --preset small --out DIR` (see bench/__main__.py)."""
