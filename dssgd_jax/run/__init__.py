"""The run layer: flags -> :class:`Config` -> rules and protocol -> the loop.

The only package that knows both the command-line configuration and the
library. ``config`` defines the fields, flags and validation; ``build`` turns
a config into upload/download rules, a protocol and a privacy claim;
``experiment`` is the epoch loop (evaluation, metrics, checkpoints, resume);
``events`` writes TensorBoard scalars.
"""
