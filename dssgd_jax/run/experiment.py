"""The epoch loop: train, evaluate, log, checkpoint, resume (SPEC section 6).

``run(plan)`` runs a :class:`~dssgd_jax.run.plan.Plan`, built from flags by
:func:`dssgd_jax.run.build.plan` (what ``python -m dssgd_jax.main`` does) or
by hand in Python; a :class:`~dssgd_jax.run.config.Config` is accepted too
and built first. Either way the run writes into its work directory what
:mod:`dssgd_jax.run.outputs` lists (config and plan, metrics, checkpoints,
TensorBoard events, summary, figures), with the ε and δ derived from the
plan's upload rule, ``num_seeds`` runs as one program, and the end-to-end
audit's canary scores when the plan has canaries.

Rerunning the same plan resumes from the last complete checkpoint. Epoch
keys are ``fold_in(train_key, epoch)``, so a resumed run draws the same random
numbers and produces the same metrics as an uninterrupted one. In a
multi-process run only process 0 writes. Every failure a user can cause is
one :class:`~dssgd_jax.errors.UserError` sentence; Ctrl-C is
:class:`~dssgd_jax.errors.Interrupted` (exit status 130).

>>> from dssgd_jax.run import build
>>> from dssgd_jax.run.config import Config
>>> plan = build.plan(build.validate(Config(
...     dataset="digits", model="digits_mlp", num_participants=3,
...     samples_per_participant=20, batch_size=10, epochs=1,
...     progress=False)))
>>> exp = setup(plan)
>>> exp.num_models, exp.num_params
(3, 4810)
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import _io
from dssgd_jax import algorithms
from dssgd_jax import canaries as canaries_lib
from dssgd_jax import evaluation
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import server as server_lib
from dssgd_jax import sharding as sharding_lib
from dssgd_jax.errors import ConfigError, Interrupted, NonFiniteError
from dssgd_jax.run import data as data_lib
from dssgd_jax.run import events as events_lib
from dssgd_jax.run import outputs
from dssgd_jax.run.plan import Plan

# The files a run writes (:mod:`dssgd_jax.run.outputs`).
CHECKPOINT = outputs.CHECKPOINT
METRICS = outputs.METRICS
CONFIG = outputs.CONFIG
SUMMARY = outputs.SUMMARY
TIMING_FIELDS = outputs.TIMING_FIELDS
KILL_AFTER_EPOCH_ENV = outputs.KILL_AFTER_EPOCH_ENV
KILL_IN_CHECKPOINT_ENV = outputs.KILL_IN_CHECKPOINT_ENV
KILLED_EXIT = outputs.KILLED_EXIT
save_checkpoint = outputs.save_checkpoint
load_checkpoint = outputs.load_checkpoint


@flax.struct.dataclass
class RunState:
  """A run's state (a pytree; a leading seed axis with several seeds).

  Attributes:
    protocol: the protocol's :class:`~dssgd_jax.protocols.State`.
    canary_scores: (m,) the canaries' scores so far (None without canaries).
  """
  protocol: protocols.State
  canary_scores: jax.Array | None = None


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from a plan (see :func:`setup`)."""
  plan: Plan
  model: Any
  unravel: Callable
  num_params: int
  protocol: protocols.Protocol
  axis: protocols.ParticipantAxis
  epoch_fn: Callable            # jitted (state, data, key) -> (state, stats)
  init_state: RunState
  data: participant_lib.ParticipantData   # private data, participant axis
  evaluate: Callable            # state -> (accuracies, server accuracy)
  test_images: np.ndarray
  test_labels: np.ndarray
  train_key: jax.Array          # () or, with seeds, (S,)
  num_seeds: int = 1
  canaries: canaries_lib.Canaries | None = None

  @property
  def cfg(self):
    """The config the plan was built from (None for a hand-made plan)."""
    return self.plan.config

  @property
  def num_models(self) -> int:
    """Models per run: N participants (1 for ``centralized``)."""
    local = self.init_state.protocol.local.params
    return int(local.shape[1 if self.num_seeds > 1 else 0])

  @property
  def upload_rule(self):
    return self.plan.upload_rule

  @property
  def shares(self) -> bool:
    """Whether the server model is ever updated."""
    return self.plan.shares


def as_plan(plan_or_config) -> Plan:
  """A plan, building (and validating) a config given instead."""
  if isinstance(plan_or_config, Plan):
    return plan_or_config
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  return build.plan(build.validate(plan_or_config))


def make_protocol(plan: Plan, update: Callable,
                  axis: protocols.ParticipantAxis) -> protocols.Protocol:
  """The plan's protocol or algorithm over a participant ``update``."""
  p = plan.protocol
  if callable(p):
    return p(update, plan.download_rule, plan.aggregation, axis, plan)
  common = dict(aggregation=plan.aggregation, upload_loss=plan.upload_loss,
                download_loss=plan.download_loss)
  if p == "standalone":
    return algorithms.standalone(update, axis=axis)
  if p == "fedavg":
    return algorithms.fedavg(update, axis=axis, **common)
  common.update(stat_decay=plan.stat_decay, decay_every=plan.decay_every)
  if p == "round_robin":
    return protocols.round_robin(update, plan.download_rule, **common)
  if p == "parallel":
    return protocols.parallel(update, plan.download_rule, axis=axis, **common)
  if p == "async":
    return protocols.asynchronous(update, plan.download_rule, axis=axis,
                                  staleness=plan.staleness,
                                  max_staleness=plan.max_staleness, **common)
  raise ConfigError(f"protocol {p!r} is not one of round_robin, parallel, "
                    "async, fedavg, standalone, or a callable.")


def make_trainer(plan: Plan, model, unravel) -> participant_lib.Trainer:
  """The plan's local training."""
  return participant_lib.make_trainer(
      model.apply, unravel, plan.batch_size, plan.optimizer,
      reset_on_download=plan.reset_optimizer, shuffle=plan.shuffle)


def canary_scale(plan: Plan) -> float:
  """A canary entry's size: the plan's, else the L∞ bound the upload rule
  declares, else 0 (the participant's largest |Δw| entry each epoch)."""
  if plan.canary_scale:
    return float(plan.canary_scale)
  bound = None
  p = rules.Privacy(slots=plan.num_params)
  for part in (plan.upload_rule.parts or (plan.upload_rule,)):
    p = rules.declared_privacy(part, p)
    if p.linf is not None:
      bound = p.linf if bound is None else min(bound, p.linf)
  return 0.0 if bound is None else float(bound)


def _run_epoch(protocol: protocols.Protocol, canaries):
  """One run's epoch: the protocol's, and the canaries' observations."""
  def epoch(state: RunState, data, key):
    new, stats = protocol.epoch(state.protocol, data, key)
    scores = state.canary_scores
    if canaries is not None and stats.received is not None:
      owner, index, sign = canaries
      scores = scores + canaries_lib.observe(stats.received, owner, index,
                                             sign)
    return RunState(new, scores), stats._replace(received=None)
  return epoch


def load_data(plan: Plan):
  """``(dataset, parts)`` the plan names (:func:`dssgd_jax.run.data.load`)."""
  return data_lib.load(plan.data, plan.model)


def setup(plan_or_config, dataset=None, parts=None) -> Experiment:
  """Loads data, builds the model, the protocol, the state and the jitted
  epoch.

  With ``num_seeds`` S > 1 every array of the state (and the PRNG key) has a
  leading seed axis of size S, the private data too with ``vary_partition``,
  and the epoch maps the protocol's epoch over it (``seed_axis``): run s is
  the run of ``seed + s``.

  Args:
    plan_or_config: a :class:`~dssgd_jax.run.plan.Plan` (or a config, built
      into one).
    dataset: optional preloaded dataset (as :func:`load_data` returns it:
      preprocessed, not standardized).
    parts: optional partition indices to go with ``dataset``.
  """
  plan = as_plan(plan_or_config)
  if dataset is None:
    dataset, parts = load_data(plan)
  num_seeds = int(plan.num_seeds)
  model = models_lib.get_model(plan.model, dataset.num_classes,
                               conv_impl=plan.conv_impl)
  init_keys, train_keys = [], []
  for s in range(num_seeds):
    init_key, train_key = jax.random.split(jax.random.key(plan.seed + s))
    init_keys.append(init_key)
    train_keys.append(train_key)
  flats = []
  for init_key in init_keys:
    params = models_lib.init_params(model, dataset.image_shape, init_key)
    flat, unravel = participant_lib.flatten_params(params)
    flats.append(flat)
  num_params = int(flats[0].shape[0])
  if num_params != plan.num_params:
    raise ConfigError(f"the model {plan.model} has {num_params:,} parameters "
                      f"on this data but the plan was built for "
                      f"{plan.num_params:,}.")
  seed_parts = data_lib.seed_partitions(plan.data, dataset.train_labels,
                                        np.asarray(parts), num_seeds)
  layouts = [data_lib.layout(plan.data, dataset, p)
             for p in seed_parts[:num_seeds if plan.data.vary_partition
                                 else 1]]
  data = layouts[0].data
  num_models = data.labels.shape[0]
  if num_seeds > 1:  # one device (config validation rejects --mesh_shape)
    place = sharding_lib.placement(num_models, 1)
  else:
    place = sharding_lib.placement(num_models, plan.mesh_shape)
  axis = protocols.ParticipantAxis(
      plan.participant_axis,
      place.mesh if plan.participant_axis == "map" else None)
  trainer = make_trainer(plan, model, unravel)
  canaries = None
  if plan.canaries and plan.shares:
    canaries = canaries_lib.draw(plan.canaries, num_models, num_params,
                                 plan.data.seed)
    data = data._replace(canary=canaries_lib.vectors(canaries, num_models,
                                                     num_params))
  update = participant_lib.make_update(trainer, plan.upload_rule,
                                       canary_scale(plan) if canaries
                                       else 0.0)
  proto = make_protocol(plan, update, axis)
  design = None if canaries is None else tuple(
      jnp.asarray(a) for a in (canaries.owner, canaries.index,
                               canaries.sign))
  run_epoch = _run_epoch(proto, design)
  scores0 = (None if canaries is None else
             jnp.zeros((plan.canaries,), jnp.float32))
  states = []
  for f in flats:
    local = jax.vmap(trainer.init)(jnp.tile(f[None], (num_models, 1)))
    states.append(RunState(proto.init(server_lib.init(f), local), scores0))

  test_x, test_y = data_lib.evaluation_split(plan.data, dataset)
  server_x, server_y = data_lib.server_test_split(plan.data, dataset)
  evaluate = evaluation.make_evaluator(model.apply, unravel, test_x, test_y,
                                       num_seeds * num_models)
  server_eval = evaluation.make_evaluator(model.apply, unravel, server_x,
                                          server_y, num_seeds)
  stats = [l.stats for l in layouts]

  def evaluate_all(st: RunState):
    """(accuracies, server accuracy): (P,) and a float (or None); with
    seeds (S, P) and (S,)."""
    local = st.protocol.local.params
    own = None
    if stats[0] is not None:  # each model standardizes with its own data
      own = data_lib.Stats(*(np.concatenate([
          getattr(stats[min(s, len(stats) - 1)], f) for s in range(
              num_seeds)]) for f in ("shift", "scale")))
    if num_seeds > 1:
      local = local.reshape((-1,) + local.shape[2:])
    acc = np.asarray(evaluate(local, own))
    if num_seeds > 1:
      acc = acc.reshape(num_seeds, num_models)
    if plan.data.centralized:  # the one model is also the server's
      return acc, (acc[:, 0] if num_seeds > 1 else float(acc[0]))
    if not plan.shares:
      return acc, None  # nothing is shared: the server is never updated
    server = st.protocol.server.params
    server_acc = np.asarray(server_eval(server if num_seeds > 1
                                        else server[None]))
    return acc, (server_acc if num_seeds > 1 else float(server_acc[0]))

  if num_seeds == 1:
    state = states[0].replace(protocol=place.put_state(states[0].protocol))
    epoch_fn = (rules.with_checks(run_epoch) if plan.checked else
                place.jit_epoch(run_epoch))
    train_key = train_keys[0]
  else:
    state = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)
    if plan.data.vary_partition:
      data = jax.tree_util.tree_map(lambda *x: np.stack(x),
                                    *[l.data._replace(canary=data.canary)
                                      for l in layouts])
    seeds_epoch = protocols.over_seeds(
        run_epoch, plan.seed_axis, shared_data=not plan.data.vary_partition)
    epoch_fn = (rules.with_checks(seeds_epoch) if plan.checked else
                jax.jit(seeds_epoch, donate_argnums=(0,)))
    train_key = jnp.stack(train_keys)
  data = place.put_data(data)
  return Experiment(
      plan=plan, model=model, unravel=unravel, num_params=num_params,
      protocol=proto, axis=axis, epoch_fn=epoch_fn, init_state=state,
      data=data, evaluate=evaluate_all, test_images=test_x,
      test_labels=test_y, train_key=train_key, num_seeds=num_seeds,
      canaries=canaries)


def epoch_key(train_key: jax.Array, epoch: int) -> jax.Array:
  """The PRNG key of ``epoch``: ``fold_in(train_key, epoch)``, per seed when
  ``train_key`` has a seed axis."""
  if train_key.ndim:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(train_key, epoch)
  return jax.random.fold_in(train_key, epoch)


def _stderr(msg: str) -> None:
  # One write per line: print() writes the text and the newline separately,
  # and a Ctrl-C between the two would leave a half line that the error
  # sentence then continues.
  sys.stderr.write(f"{msg}\n")
  sys.stderr.flush()


def run(plan_or_config, dataset=None, parts=None, log=None,
        workdir: str | None = None) -> dict:
  """Runs (or resumes) a plan; returns the summary dict.

  In a multi-process run every process computes and only process 0 writes
  (config, metrics, events, checkpoints, summary, figures); the others read
  the checkpoint to resume.

  Args:
    plan_or_config: a :class:`~dssgd_jax.run.plan.Plan`, or a
      :class:`~dssgd_jax.run.config.Config` (built into one).
    dataset, parts: optional preloaded data (see :func:`setup`).
    log: callable for progress lines (default: print to stderr).
    workdir: where the run writes (default: the config's ``workdir``).

  Raises:
    ConfigError: the work directory cannot be written, holds another run, or
      holds more epochs than the plan's.
    Interrupted: Ctrl-C (one sentence naming the last checkpoint).
  """
  log = log or _stderr
  plan = as_plan(plan_or_config)
  if workdir is None and plan.config is not None:
    workdir = plan.config.workdir
  writer = jax.process_index() == 0
  created = outputs.missing_dirs(workdir) if writer else []
  outputs.prepare_workdir(workdir, writer)
  try:
    outputs.check_resumable(workdir, plan)
    exp = setup(plan, dataset, parts)
  except BaseException:
    outputs.remove_if_empty(created)  # nothing written: leave no trace
    raise
  ckpt_path = os.path.join(workdir, CHECKPOINT)
  metrics_path = os.path.join(workdir, METRICS)
  state, start = exp.init_state, 0
  if os.path.exists(ckpt_path):  # read (and check) it before writing anything
    state, start = load_checkpoint(ckpt_path, exp.init_state, exp.train_key)
    if start > plan.epochs:
      raise ConfigError(
          f"Nothing was run: --workdir={workdir} already holds {start} "
          f"epochs, more than --epochs={plan.epochs}; pass --epochs={start} "
          "or more, or use a new --workdir.")
    if plan.progress and start < plan.epochs:
      log(f"Resuming {workdir} after epoch {start}.")
  rows = [r for r in outputs.read_metrics(metrics_path) if r["epoch"] <= start]
  if writer:
    import json  # pylint: disable=g-import-not-at-top
    outputs.write_json(os.path.join(workdir, CONFIG),
                       json.dumps(outputs.config_json(plan), indent=2,
                                  sort_keys=True))
    outputs.write_lines(metrics_path, rows)
    if exp.canaries is not None:
      canaries_lib_save(workdir, exp.canaries)

  num_models = exp.num_models
  if plan.progress and start < plan.epochs:
    mesh = exp.axis.mesh
    axis = ("" if exp.protocol.name == "round_robin" else
            f", participant axis {exp.axis.lowering}")
    log(f"[{plan.algorithm}] {num_models} model(s) x {exp.num_params:,} "
        f"parameters, protocol {exp.protocol.name}{axis}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
        + ("" if mesh is None else f" (participants split over {mesh.size})"))
  elapsed = rows[-1]["elapsed_s"] if rows else 0.0
  with _io.interrupts_deferred():
    tb = (events_lib.open_writer(workdir, resume_epoch=start) if writer
          else None)
  epoch_times = []
  saved, running = start, start + 1
  try:
    for epoch in range(start + 1, plan.epochs + 1):
      running = epoch
      t0 = time.time()
      key = epoch_key(exp.train_key, epoch)
      new_state, stats = exp.epoch_fn(state, exp.data, key)
      losses = np.asarray(stats.loss)
      if not np.all(np.isfinite(losses)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(losses))[0])
        who = "the model" if plan.data.centralized else (
            f"participant {bad[-1]}")
        if exp.num_seeds > 1:
          who += f" of the run with seed {plan.seed + bad[0]}"
        raise NonFiniteError(
            f"Epoch {epoch}: {who} has a non-finite training loss "
            f"({losses[bad]}); stopping — try a smaller --learning_rate "
            f"(outputs up to epoch {epoch - 1} are kept in {workdir}).")
      state = new_state
      row = metrics_row(exp, epoch, state, stats, time.time() - t0, elapsed)
      elapsed = row["elapsed_s"]
      rows.append(row)
      # A Ctrl-C during the epoch's writes acts when they are all done.
      with _io.interrupts_deferred():
        if writer:
          outputs.append_metrics(metrics_path, row)
          if tb is not None:
            tb.write(epoch, row)
        if epoch % plan.checkpoint_every == 0 or epoch == plan.epochs:
          if writer:
            with outputs.writing(ckpt_path):
              save_checkpoint(ckpt_path, state, epoch, exp.train_key)
          saved = epoch
      epoch_times.append(row["wall_time_s"])
      if plan.progress:
        log(outputs.progress_line(plan, row, epoch_times))
      if outputs.kill_requested(KILL_AFTER_EPOCH_ENV, epoch):
        os._exit(KILLED_EXIT)  # pylint: disable=protected-access
  except KeyboardInterrupt:
    raise Interrupted(
        f"Interrupted during epoch {running}; the last checkpoint in "
        f"{workdir} is epoch {saved}; rerun the same "
        "command to resume.") from None
  finally:
    if tb is not None:
      tb.close()
  summary = outputs.summarize(plan, rows)
  summary["privacy"] = outputs.privacy_note(plan, summary["epochs"])
  if plan.name:
    summary["name"] = plan.name
  if writer:
    import json  # pylint: disable=g-import-not-at-top
    outputs.write_json(os.path.join(workdir, SUMMARY),
                       json.dumps(summary, indent=2))
    outputs.draw_figures(workdir, log)
  return summary


def canaries_lib_save(workdir: str, canaries) -> None:
  """``canaries.npz``: the canaries' design and which were included (read
  by the audit with the scores in the checkpoint)."""
  path = os.path.join(workdir, "canaries.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **canaries._asdict())
  os.replace(tmp, path)


def metrics_row(exp: Experiment, epoch: int, state, stats, wall: float,
                elapsed: float) -> dict:
  """One line of ``metrics.jsonl`` (see README "What a run writes").

  With seeds every per-run field is the mean over the seeds, with a
  ``<field>_std`` companion (sample standard deviation, ``ddof=1``) and the
  runs' own values in ``per_seed``.
  """
  plan = exp.plan
  num_seeds = exp.num_seeds
  acc = server_acc = None
  if outputs.is_eval_epoch(plan, epoch):
    acc, server_acc = exp.evaluate(state)
  per = []
  for s in range(num_seeds):
    if num_seeds == 1:
      per.append(outputs.run_fields(plan, epoch, acc, server_acc, stats))
    else:
      per.append(outputs.run_fields(
          plan, epoch, None if acc is None else acc[s],
          None if server_acc is None else float(server_acc[s]),
          jax.tree_util.tree_map(lambda x, s=s: x[s], stats)))
  row = {"epoch": epoch}
  if num_seeds == 1:
    row.update(per[0])
  else:
    row.update(outputs.mean_over_seeds(per))
  row.update(num_models=exp.num_models,
             num_params=exp.num_params,
             wall_time_s=wall,
             elapsed_s=elapsed + wall)
  if num_seeds > 1:
    row["num_seeds"] = num_seeds
    row["per_seed"] = [dict(seed=plan.seed + s, **p)
                       for s, p in enumerate(per)]
  return row
