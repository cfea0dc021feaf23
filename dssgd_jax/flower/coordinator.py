"""The parameter server's side of a deployed run, without Flower in it.

:class:`Coordinator` holds the :class:`~dssgd_jax.server.ServerState` and
does exactly what the simulated protocols do on the server
(:func:`dssgd_jax.protocols.round_robin`, :func:`~dssgd_jax.protocols.parallel`):
choose each participant's download with the run's download rule (and the
simulation's keys), apply the uploads it gets back (``apply_uploads``, jitted)
and end the epoch (``end_epoch``). The Flower ``ServerApp``
(:mod:`.server_app`) moves the messages; a participant that does not answer is
a lost upload, as ``--upload_loss`` models it in the simulation.

The server never holds participant data: it builds the initial model from the
run's seed and the dataset's image shape alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib
from dssgd_jax.data import datasets as datasets_lib
from dssgd_jax.data import transforms


def initial_model(plan) -> tuple[np.ndarray, jax.Array, object]:
  """(initial flat parameters, train key, model) exactly as the simulation
  draws them from the plan's seed (:func:`dssgd_jax.run.experiment.setup`)."""
  model = models_lib.get_model(plan.model, datasets_lib.NUM_CLASSES,
                               conv_impl=plan.conv_impl)
  init_key, train_key = jax.random.split(jax.random.key(plan.seed))
  shape = transforms.model_input_shape(plan.model, plan.data.image_shape)
  params = models_lib.init_params(model, shape, init_key)
  flat, unravel = participant_lib.flatten_params(params)
  return np.asarray(flat), train_key, (model, unravel)


class Coordinator:
  """The server of a DSSGD run: downloads out, uploads in.

  Args:
    cfg: the run's validated config (``--algorithm=dssgd``), or its plan.
    state: a :class:`~dssgd_jax.server.ServerState` to start from (a
      checkpoint's); None: the initial model.
  """

  def __init__(self, cfg, state: server_lib.ServerState | None = None):
    from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
    plan = experiment.as_plan(cfg)
    self.plan = plan
    flat, self.train_key, (self.model, self.unravel) = initial_model(plan)
    self.initial = flat
    self.num_params = int(flat.shape[0])
    self.num = int(plan.data.num_participants)
    self.download = plan.download_rule
    rule = plan.upload_rule
    self.slots = (rules.privacy_of(rule, self.num_params).slots
                  if rule is not None else 0)
    self.state = server_lib.init(jnp.asarray(flat)) if state is None else state
    self.aggregation_state = plan.aggregation.init(self.state.params)
    download = self.download
    self._mask = jax.jit(lambda srv, k: download.mask(srv, k))
    agg = plan.aggregation
    self._apply = jax.jit(agg.apply)
    decay, every = float(plan.stat_decay), int(plan.decay_every)
    self._end = jax.jit(lambda srv: server_lib.end_epoch(srv, decay, every))

  def download_keys(self, epoch: int) -> jax.Array:
    """(N,) the simulation's download keys of ``epoch``."""
    key = jax.random.fold_in(self.train_key, epoch)
    both = jax.vmap(jax.random.split)(protocols.participant_keys(key,
                                                                 self.num))
    return both[:, 0]

  def visit_download_key(self, index: int, visit: int) -> jax.Array:
    """The download key of participant ``index``'s ``visit``-th training
    in an asynchronous run (:func:`dssgd_jax.protocols.visit_key`)."""
    return jax.random.split(protocols.visit_key(self.train_key, visit,
                                                index))[0]

  def download_for(self, index: int, key: jax.Array,
                   state: server_lib.ServerState | None = None
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """Participant ``index``'s download from ``state`` (default: now):
    (indices, values), indices None when it is the whole vector."""
    state = self.state if state is None else state
    mask = np.asarray(self._mask(state, key))
    params = np.asarray(state.params)
    if mask.all():
      return None, params.copy()
    idx = np.flatnonzero(mask).astype(np.int32)
    return idx, params[idx]

  def _padded(self, uploads: list) -> selection_lib.Upload:
    """(P, c) Upload from per-participant (indices, values) or None (lost)."""
    c = max([self.slots] + [len(u[0]) for u in uploads if u is not None])
    idx = np.zeros((len(uploads), c), np.int32)
    val = np.zeros((len(uploads), c), np.float32)
    mask = np.zeros((len(uploads), c), bool)
    for p, u in enumerate(uploads):
      if u is None:
        continue
      n = len(u[0])
      idx[p, :n], val[p, :n], mask[p, :n] = u[0], u[1], True
    return selection_lib.Upload(jnp.asarray(idx), jnp.asarray(val),
                                jnp.asarray(mask))

  def receive(self, uploads: list, weights: list | None = None) -> None:
    """Aggregates uploads into the global vector (the plan's aggregation):
    a list of (indices, values), or None for a lost upload (several at
    once: the parallel protocol); ``weights`` the uploaders' example
    counts (default: equal)."""
    if all(u is None for u in uploads):
      return
    w = jnp.asarray(np.ones(len(uploads), np.float32) if weights is None
                    else np.asarray(weights, np.float32))
    self.state, self.aggregation_state = self._apply(
        self.state, self.aggregation_state, self._padded(uploads), w)

  def end_epoch(self) -> None:
    self.state = self._end(self.state)
