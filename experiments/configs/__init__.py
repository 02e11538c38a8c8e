"""Plain-Python experiment configs for `gradax.experiments.run --config=...`."""
