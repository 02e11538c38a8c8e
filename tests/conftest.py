"""Test-suite set-up: JAX gets 8 CPU devices before any backend is initialised."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
