"""``python -m dssgd_jax.audit``: runs :mod:`dssgd_jax.tools.audit` as the program
(a thin entry point; the code, its flags and its --help are there)."""

import runpy

if __name__ == "__main__":
  runpy.run_module("dssgd_jax.tools.audit", run_name="__main__", alter_sys=True)
