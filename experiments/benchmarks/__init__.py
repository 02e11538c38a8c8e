"""Benchmarks run by `python -m gradax.experiments.bench NAME`; one module per benchmark."""
