"""The Flower ``ClientApp``: one participant (:class:`.node.Participant`).

Started by a SuperNode (``flower-supernode ... --node-config "partition-id=0
state-dir='/var/lib/dssgd/p0'"``, docs/deployment.md). Node config:

* ``partition-id`` (int, required): the participant's position i in the
  protocol's order;
* ``state-dir`` (path, required): where its models, seed, ledger and JAX's
  compilation cache are kept (they survive restarts of the SuperNode);
* ``data-dir`` (path): its own data (``data.npz``, see
  :func:`.node.load_data_dir`); without it the run's dataset is partitioned
  as the simulation does and part i is kept (tests and demos);
* ``seed`` (int): its PRNG seed (tests pass the run's ``--seed`` to compare
  with the simulation); by default a random one kept in ``state-dir``;
* ``require-guarantee`` (bool, default true), ``epsilon-budget`` (default
  10), ``delta-budget`` (default 1e-5), ``report-metrics`` (bool, default
  false): the participant's :class:`.node.Policy`, what it accepts to
  release (set by ``python -m dssgd_jax.flower participant``, never by the
  server).

The run's configuration comes from the server with every message; the
participant checks it (``config.validate``) and its policy before it trains.
A reply carries only what :class:`.node.Visit` lets out: the upload's
(index, value) pairs with the partition id and the epoch, or a refusal; the
loss and accuracy only when the policy reports them.
"""

import json
import os

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dssgd_jax.flower import wire

app = ClientApp()

_PARTICIPANTS = {}  # (run config, node config) -> Participant (per process)


def run_state_dir(state_dir: str, cfg) -> str:
  """``state_dir/runs/<id>``: one directory per run, named by a hash of
  the run's flags but those a resumed run may change (``--epochs``, ...),
  so that a restarted run finds the participant's models and another run
  starts fresh."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import hashlib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import outputs  # pylint: disable=g-import-not-at-top
  keep = {k: v for k, v in dataclasses.asdict(cfg).items()
          if k == "workdir" or k not in outputs.RESUMABLE_FLAGS}
  digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode())
  return os.path.join(state_dir, "runs", digest.hexdigest()[:16])


def _node_config(context: Context) -> dict:
  cfg = dict(context.node_config)
  if "partition-id" not in cfg or "state-dir" not in cfg:
    raise ValueError("the SuperNode needs --node-config with partition-id "
                     "and state-dir")
  return cfg


def _participant(message: Message, context: Context):
  node = _node_config(context)
  run_json = message.content[wire.CONFIG]["run"]
  key = (run_json, json.dumps(node, sort_keys=True))
  if key not in _PARTICIPANTS:
    state_dir = str(node["state-dir"])
    os.makedirs(state_dir, exist_ok=True)
    import jax  # pylint: disable=g-import-not-at-top
    # A participant compiles once per machine, not at every start.
    if not jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir",
                        os.path.join(state_dir, "jax_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from dssgd_jax.flower import node as node_lib  # pylint: disable=g-import-not-at-top
    from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
    from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg = build.validate(config_lib.Config.from_dict(
        json.loads(run_json)))
    seed = node.get("seed")
    policy = policy_of(node)
    _PARTICIPANTS.clear()
    _PARTICIPANTS[key] = node_lib.Participant(
        cfg, int(node["partition-id"]), run_state_dir(state_dir, cfg),
        data_dir=node.get("data-dir") or None,
        seed=None if seed is None else int(seed), policy=policy,
        ledger_path=os.path.join(state_dir, node_lib.LEDGER))
  return _PARTICIPANTS[key]


def policy_of(node: dict):
  """The :class:`.node.Policy` in a SuperNode's node config."""
  from dssgd_jax.flower import node as node_lib  # pylint: disable=g-import-not-at-top
  default = node_lib.Policy()
  return node_lib.Policy(
      require_guarantee=bool(node.get("require-guarantee",
                                      default.require_guarantee)),
      epsilon_budget=float(node.get("epsilon-budget", default.epsilon_budget)),
      delta_budget=float(node.get("delta-budget", default.delta_budget)),
      report_metrics=bool(node.get("report-metrics", default.report_metrics)))


@app.query()
def hello(message: Message, context: Context) -> Message:
  """Who this participant is: its partition id."""
  node = _node_config(context)
  return Message(RecordDict({wire.METRICS: wire.metrics(
      partition_id=int(node["partition-id"]))}), reply_to=message)


def reply_content(visit) -> RecordDict:
  """The reply to a train message: exactly what :class:`.node.Visit` lets
  out (upload and protocol fields; loss and accuracy only when reported)."""
  content = RecordDict({wire.METRICS: wire.metrics(
      partition_id=visit.partition_id, epoch=visit.epoch, loss=visit.loss,
      accuracy=visit.accuracy)})
  if visit.refused:
    content[wire.CONFIG] = wire.config(refused=visit.refused)
  else:
    content[wire.UPLOAD] = wire.arrays(indices=visit.indices,
                                       values=visit.values)
  return content


def handle(message: Message, context: Context) -> Message:
  """Every message type of the app (what ``python -m dssgd_jax.flower
  participant`` runs in its own warm process, :mod:`.executor`)."""
  return {wire.TRAIN: train, wire.HELLO: hello}[
      message.metadata.message_type](message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
  """Policy check, download, one local epoch, upload
  (:meth:`.node.Participant.visit`).

  When the config carries ``evaluate=1`` (an evaluation epoch) and the
  participant's policy reports metrics, it also reports the test accuracy of
  the model it just trained: its model does not change again before the
  epoch ends, so this is the accuracy the simulation reports, without a
  second message.
  """
  from dssgd_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  conf = message.content[wire.CONFIG]
  try:
    p = _participant(message, context)
    down = message.content[wire.DOWNLOAD]
    init = (message.content[wire.INIT] if wire.INIT in message.content.
            array_records else None)
    visit = p.visit(int(conf["epoch"]), wire.get(down, "indices"),
                    wire.get(down, "values"),
                    None if init is None else wire.get(init, "values"),
                    evaluate=bool(int(conf.get("evaluate", 0))))
  except UserError as e:  # e.g. its data does not fit the run: one sentence
    _log_line(str(e))
    # What is wrong with its data file may name values computed from the
    # data (their range): that stays in its own log.
    from dssgd_jax.flower import node as node_lib  # pylint: disable=g-import-not-at-top
    public = (node_lib.DATA_FILE_REFUSAL
              if isinstance(e, node_lib.DataFileError) else str(e))
    return Message(RecordDict({
        wire.METRICS: wire.metrics(epoch=int(conf["epoch"])),
        wire.CONFIG: wire.config(error=public)}), reply_to=message)
  return Message(reply_content(visit), reply_to=message)


def _log_line(msg: str) -> None:
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  print(f"[dssgd participant {time.strftime('%H:%M:%S')}] {msg}",
        file=sys.stderr, flush=True)
