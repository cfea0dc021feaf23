"""The participant axis over devices: one mesh axis, ``participants``.

Every per-participant array (the (P, D) local parameters and their
optimizers' states, the (P, n, ...) private data) is split over a 1-D
:class:`jax.sharding.Mesh` along its leading axis; the server state, the
aggregation's state and the async ring buffer are replicated. The epoch is one ``jit`` program: XLA's SPMD partitioner runs
each device's participants locally (the participant axis is a batch axis of
every matrix product, so there is no communication inside local training) and
turns the server update (a scatter-add of every participant's sparse upload
into the replicated w_g) into one all-reduce per epoch. Random numbers are
the same on any layout (``jax_threefry_partitionable``), so a sharded run
gives the metrics of a one-device run (``tests/test_sharding.py`` checks 8
forced CPU devices against 1).

Mesh size (``--mesh_shape``): 0 takes the largest number of devices, at most
all of them, that divides the participant count; a positive value asks for
exactly that many. Multi-host (``--coordinator_address``, ``--num_processes``,
``--process_id``; ``cli.setup_devices`` calls ``jax.distributed.initialize``)
uses every process's devices: each process loads the same data and
contributes its own shards (``jax.make_array_from_callback``), and the state
that leaves an epoch is replicated so every process can log, evaluate and
checkpoint it. On a TPU pod slice or a GPU cluster run the same command on
every host (``--coordinator_address=host0:port --num_processes=H
--process_id=h``); on Cloud TPU ``jax.distributed.initialize()`` can also find
the coordinator itself. On CPU JAX uses gloo collectives across processes
(tested with two processes on localhost in ``tests/test_sharding.py``).
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dssgd_jax.errors import ConfigError

AXIS = "participants"


def mesh_size(num_models: int, requested: int = 0,
              num_devices: int | None = None) -> int:
  """How many devices the participant axis is split over.

  >>> mesh_size(30, 0, 8)   # largest divisor of 30 that is <= 8
  6
  >>> mesh_size(30, 0, 1)
  1
  """
  n = jax.device_count() if num_devices is None else num_devices
  if requested:
    if requested > n:
      raise ConfigError(f"--mesh_shape={requested} asks for more devices than "
                        f"the {n} available.")
    if num_models % requested:
      raise ConfigError(f"--mesh_shape={requested} does not divide the "
                        f"{num_models} participants' models.")
    return requested
  return max(d for d in range(1, min(n, num_models) + 1)
             if num_models % d == 0)


@dataclasses.dataclass
class Placement:
  """Where the run's arrays live, and the jitted epoch that keeps them there.

  ``mesh`` is None on one device: then everything is a plain single-device
  array and :meth:`jit_epoch` is ``jax.jit``.
  """
  mesh: Mesh | None

  @property
  def multi_process(self) -> bool:
    return jax.process_count() > 1

  def sharded(self, ndim: int = 1) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(AXIS, *([None] * (ndim - 1))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def _put(self, x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  def put_data(self, data):
    """Private data (a pytree with a leading participant axis), split by
    participant."""
    if self.mesh is None:
      return jax.tree_util.tree_map(jax.numpy.asarray, data)
    return jax.tree_util.tree_map(
        lambda x: self._put(x, self.sharded(np.ndim(x))), data)

  def state_shardings(self, state):
    """Every participant's local state (the arrays under a ``local``
    field) split by participant (one process); the rest whole."""
    rep = self.replicated()

    def sharding(path, x):
      if not self.multi_process and _under_local(path):
        return self.sharded(np.ndim(x))
      return rep

    return jax.tree_util.tree_map_with_path(sharding, state)

  def put_state(self, state: dict) -> dict:
    if self.mesh is None:
      return state
    return jax.tree_util.tree_map(
        lambda x, s: x if getattr(x, "sharding", None) == s else self._put(
            x, s), state, self.state_shardings(state))

  def jit_epoch(self, epoch_fn: Callable) -> Callable:
    """``jax.jit`` of ``epoch_fn(state, data, key) -> (state, stats)`` that
    computes with the participant axis split over the mesh."""
    if self.mesh is None:
      return jax.jit(epoch_fn, donate_argnums=(0,))
    rep = self.replicated()

    def constrained(state, data, key_data, impl):
      key = jax.random.wrap_key_data(key_data, impl=impl)
      state = jax.tree_util.tree_map_with_path(
          lambda path, x: jax.lax.with_sharding_constraint(
              x, self.sharded(np.ndim(x))) if _under_local(path) else x,
          state)
      new_state, stats = epoch_fn(state, data, key)
      shardings = self.state_shardings(new_state)
      new_state = jax.lax.with_sharding_constraint(new_state, shardings)
      stats = jax.lax.with_sharding_constraint(
          stats, jax.tree_util.tree_map(lambda _: rep, stats))
      return new_state, stats

    jitted = jax.jit(constrained, donate_argnums=(0,), static_argnums=(3,))

    def run(state, data, key):
      # A state read from a checkpoint arrives as plain host-side arrays;
      # the key travels as its raw data (replicated on every process).
      key_data = jax.random.key_data(key)
      if self.multi_process:
        key_data = self._put(key_data, rep)
      return jitted(self.put_state(state), data, key_data,
                    jax.random.key_impl(key))

    run.jitted = jitted
    return run


def _under_local(path) -> bool:
  """Whether a key path leads into a ``local`` field (the participants'
  state, with a leading participant axis)."""
  return any(getattr(k, "name", None) == "local" or
             getattr(k, "key", None) == "local" for k in path)


def placement(num_models: int, mesh_shape: int = 0) -> Placement:
  """The placement of ``num_models`` participant models over ``mesh_shape``
  devices (0: as many as divide the models, see :func:`mesh_size`)."""
  n = mesh_size(num_models, int(mesh_shape or 0))
  if n == 1:
    return Placement(None)
  if jax.process_count() > 1 and n != jax.device_count():
    raise ConfigError(
        f"A multi-host run splits the participants over all "
        f"{jax.device_count()} devices, which must divide the {num_models} "
        "participants' models; change --num_participants or --mesh_shape.")
  devices = np.asarray(jax.devices()[:n])
  return Placement(Mesh(devices, (AXIS,)))
