"""Datasets, preprocessing and participant partitions (SPEC section 5)."""

from dssgd_jax.data.base import Dataset
from dssgd_jax.data.digits import load_digits
from dssgd_jax.data import partition
