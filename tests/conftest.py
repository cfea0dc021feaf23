"""Shared test setup: keep JAX on CPU and deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
