"""Local-epoch speed of the participant-axis and convolution lowerings.

The trial behind ``--participant_axis=auto`` and ``--conv_impl=auto``
(BENCHMARKS.md): P participants each run one local epoch of SGD
(``participant.make_trainer``) in one jitted program, with

  vmap        jax.vmap over participants, im2col convolutions
  map         lax.map over participants, im2col convolutions
  map_xla     lax.map, lax.conv_general_dilated convolutions
  vmap_xla    jax.vmap, lax.conv_general_dilated (a grouped convolution)
  smap        lax.map inside jax.shard_map over all devices
  *_flaxpool  the same with flax.linen.max_pool instead of reshape-max pooling

Usage (from the repository root)::

  python benchmarks/lowerings.py vmap,map,map_xla
  MODEL=mnist_mlp BATCH=32 python benchmarks/lowerings.py vmap,map
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python benchmarks/lowerings.py map,smap

Environment: MODEL (svhn_cnn), BATCH (32), SAMPLES per participant (64),
PARTICIPANTS (30). Prints samples/s (median of 3 after a warm-up) and compile
seconds for each lowering.
"""

import os
import statistics
import sys
import time
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from dssgd_jax import models
from dssgd_jax import participant


def _flax_pool(x, size, stride):
  return nn.max_pool(x, (size, size), strides=(stride, stride),
                     padding="VALID")


def build(mode, name, batch):
  impl = "xla" if "xla" in mode else "im2col"
  model = models.get_model(name, conv_impl=impl)
  shape = models.INPUT_SHAPES[name]
  flat, unravel = participant.flatten_params(
      models.init_params(model, shape, jax.random.key(1)))
  trainer = participant.make_trainer(model.apply, unravel, batch,
                                     optax.sgd(0.01))

  def epoch(flat, x, y, k, lr):  # plain SGD: lr is the trainer's 0.01
    del lr
    new, loss = trainer.epoch(trainer.init(flat), x, y, k)
    return new.params, loss

  kind = mode.split("_")[0]
  if kind == "vmap":
    fn = jax.vmap(epoch, in_axes=(0, 0, 0, 0, None))
  elif kind == "map":
    fn = lambda l, x, y, k, lr: jax.lax.map(lambda a: epoch(*a, lr),
                                            (l, x, y, k))
  elif kind == "smap":
    mesh = Mesh(np.asarray(jax.devices()), ("p",))
    inner = lambda l, x, y, k: jax.lax.map(lambda a: epoch(*a, 0.01),
                                           (l, x, y, k))
    sm = jax.shard_map(inner, mesh=mesh, in_specs=(PartitionSpec("p"),) * 4,
                       out_specs=(PartitionSpec("p"), PartitionSpec("p")))
    fn = lambda l, x, y, k, lr: sm(l, x, y, k)
  else:
    raise SystemExit(f"unknown lowering {mode!r}")
  return jax.jit(fn), flat


def main(modes):
  name = os.environ.get("MODEL", "svhn_cnn")
  batch = int(os.environ.get("BATCH", "32"))
  samples = int(os.environ.get("SAMPLES", "64"))
  num = int(os.environ.get("PARTICIPANTS", "30"))
  shape = models.INPUT_SHAPES[name]
  x = jax.random.normal(jax.random.key(0), (num, samples) + shape)
  y = jax.random.randint(jax.random.key(1), (num, samples), 0, 10)
  keys = jax.random.split(jax.random.key(2), num)
  print(f"{name}, {num} participants x {samples} examples, batch {batch}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  for mode in modes:
    with mock.patch.object(models, "_pool", _flax_pool) if mode.endswith(
        "_flaxpool") else mock.patch.object(models, "_pool", models._pool):  # pylint: disable=protected-access
      fn, flat = build(mode.replace("_flaxpool", ""), name, batch)
      local = jax.numpy.tile(flat[None], (num, 1))
      t = time.perf_counter()
      compiled = fn.lower(local, x, y, keys, 0.01).compile()
      compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(local, x, y, keys, 0.01))
    times = []
    for _ in range(3):
      t = time.perf_counter()
      jax.block_until_ready(compiled(local, x, y, keys, 0.01))
      times.append(time.perf_counter() - t)
    print(f"{mode:16s} {num * samples / statistics.median(times):10.0f} "
          f"samples/s  (compile {compile_s:.1f} s)", flush=True)


if __name__ == "__main__":
  main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["vmap", "map"])
