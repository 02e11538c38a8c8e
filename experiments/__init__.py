"""gradax.experiments: the absl runner, built-in tasks and the benchmark harness."""
