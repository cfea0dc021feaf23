"""dssgd_jax: Distributed Selective SGD (Shokri & Shmatikov, CCS 2015) in JAX."""

__version__ = "0.1.0"
