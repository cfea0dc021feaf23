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
  with the simulation); by default a random one kept in ``state-dir``.

The run's configuration comes from the server with every message; the
participant checks it (``config.validate``) before it trains.
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
  from dssgd_jax.run import experiment  # pylint: disable=g-import-not-at-top
  keep = {k: v for k, v in dataclasses.asdict(cfg).items()
          if k == "workdir" or k not in experiment._RESUMABLE_CHANGES}  # pylint: disable=protected-access
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
    # A participant compiles once per machine, not at every visit.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(state_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from dssgd_jax.flower import node as node_lib  # pylint: disable=g-import-not-at-top
    from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
    cfg = config_lib.validate(config_lib.Config.from_dict(
        json.loads(run_json)))
    seed = node.get("seed")
    _PARTICIPANTS.clear()
    _PARTICIPANTS[key] = node_lib.Participant(
        cfg, int(node["partition-id"]), run_state_dir(state_dir, cfg),
        data_dir=node.get("data-dir") or None,
        seed=None if seed is None else int(seed))
  return _PARTICIPANTS[key]


@app.query()
def hello(message: Message, context: Context) -> Message:
  """Who this participant is: its partition id."""
  node = _node_config(context)
  return Message(RecordDict({wire.METRICS: wire.metrics(
      partition_id=int(node["partition-id"]))}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
  """Download, one local epoch, upload (:meth:`.node.Participant.train`).

  When the config carries ``evaluate=1`` (an evaluation epoch), the
  participant also reports the test accuracy of the model it just trained
  (:meth:`.node.Participant.evaluate`): its model does not change again
  before the epoch ends, so this is the accuracy the simulation reports,
  without a second message.
  """
  p = _participant(message, context)
  conf = message.content[wire.CONFIG]
  down = message.content[wire.DOWNLOAD]
  init = (message.content[wire.INIT] if wire.INIT in message.content.
          array_records else None)
  epoch = int(conf["epoch"])
  out = p.train(epoch, wire.get(down, "indices"), wire.get(down, "values"),
                None if init is None else wire.get(init, "values"))
  accuracy = p.evaluate(epoch) if int(conf.get("evaluate", 0)) else None
  return Message(RecordDict({
      wire.UPLOAD: wire.arrays(indices=out["indices"], values=out["values"]),
      wire.METRICS: wire.metrics(
          partition_id=p.index, loss=out["loss"],
          downloaded=out["downloaded"], epsilon=out["epsilon"],
          accuracy=accuracy),
  }), reply_to=message)
