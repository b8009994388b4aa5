"""Test-suite set-up: float64 is enabled for ground-truth comparisons (tests that check float32
behaviour create float32 arrays explicitly)."""

import jax

jax.config.update("jax_enable_x64", True)
