"""The tools built on runs: the commands and what they share.

Above the run layer (:mod:`dssgd_jax.run`), which is above the library:
``audit`` (the end-to-end canary audit and the membership-inference audit of
a finished run), ``audit_rule`` (the mechanism audit of an upload rule),
``plot``, ``reproduce`` (the paper's Table 4), ``privacy_table``, ``sweep``
(what reproduce and privacy_table share), ``bench`` and ``bench_scale``, and
``cli`` (flag parsing and one-sentence errors for every entry point). Each
command runs as ``python -m dssgd_jax.<name>`` (a thin entry point beside the
library) or ``python -m dssgd_jax.tools.<name>``.
"""
