"""The Flower ``ServerApp``: the parameter server of a deployed DSSGD run.

Started by ``flwr run`` against a SuperLink (docs/deployment.md). Run config
(``[tool.flwr.app.config]`` or ``flwr run ... --run-config``):

* ``flags`` (text): the run's flags, as for ``python -m dssgd_jax.main``,
  e.g. ``"--flagfile=/srv/dssgd/configs/quickstart.cfg --epochs=20
  --workdir=/srv/dssgd/run1"``; ``--algorithm=dssgd`` with
  ``--protocol=round_robin`` or ``parallel``;
* ``reply-timeout`` (seconds, default 600): how long the server waits for a
  participant's upload before it counts it as lost;
* ``connect-timeout`` (seconds, default 120): how long it waits for all
  ``--num_participants`` participants to connect before the first epoch;
* ``server-eval`` (bool, default true): evaluate the server's model on the
  dataset's public test split (the server never loads training data).

It writes what a simulated run writes (``config.json``, ``metrics.jsonl``,
``checkpoint.npz``, ``summary.json``) into ``--workdir``, plus per epoch:
``missing`` (the participants that did not upload), ``wire_bytes_up`` and
``wire_bytes_down`` (bytes of the messages as Flower serializes them, per
participant that took part, beside the simulation's ``bytes_up`` /
``bytes_down``). It checkpoints its state every epoch and resumes from the
checkpoint when started again with the same flags.
"""

import json
import os
import re
import shlex
import sys
import time

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from dssgd_jax.flower import supernode as supernode_lib
from dssgd_jax.flower import wire

app = ServerApp()
# The server app's pulls of replies retry after 10 ms, not Flower's 1 s.
supernode_lib.shorten_object_retries()

PROTOCOLS = ("round_robin", "parallel", "async")
POLL_S = 0.1  # how often the server asks the SuperLink for replies


def parse_flags(text: str):
  """A validated Config from a flag string (``--flagfile`` allowed)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dssgd_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  argv = shlex.split(text)
  try:
    fv(["dssgd_jax.flower"] + argv)
  except flags.Error as e:
    raise ConfigError(f"--flags: {_flag_error_source(argv, e)}"
                      f"{' '.join(str(e).split())}") from None
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  cfg = config_lib.Config(**{n: fv[n].value for n in config_lib.FIELDS})
  if cfg.protocol == "async":
    if cfg.max_staleness or cfg.staleness != "constant":
      raise ConfigError(
          "--max_staleness and --staleness are simulation flags: a deployed "
          "--protocol=async run's staleness is real (each upload's is "
          "recorded in metrics.jsonl); leave them out.")
    # Validated as the parallel protocol, whose flags it reads.
    cfg = build.validate(cfg.replace(protocol="parallel")).replace(
        protocol="async")
  else:
    cfg = build.validate(cfg)
  if cfg.algorithm != "dssgd" or cfg.protocol not in PROTOCOLS:
    raise ConfigError(
        f"A deployed run is --algorithm=dssgd with --protocol=round_robin, "
        f"parallel or async, not --algorithm={cfg.algorithm} "
        f"--protocol={cfg.protocol}.")
  if (cfg.upload_loss or cfg.download_loss or cfg.num_seeds > 1
      or cfg.canaries):
    raise ConfigError("--upload_loss, --download_loss, --num_seeds and "
                      "--canaries are simulation flags; a deployed run's "
                      "losses are real.")
  if not cfg.workdir:
    raise ConfigError("--workdir is required in the run config's flags.")
  return cfg


def _flag_error_source(argv: list[str], error: Exception) -> str:
  """``FILE: `` when the bad flag of ``error`` comes from a flagfile of
  ``argv`` (absl does not say which), else nothing."""
  m = re.search(r"--?(\w+)", str(error)) or re.search(r"'(\w+)'",
                                                        str(error))
  if not m:
    return ""
  name = m.group(1)
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg[len("--flagfile="):]
      try:
        with open(path) as f:
          if re.search(rf"^\s*--?{re.escape(name)}\b", f.read(), re.M):
            return f"{path}: "
      except OSError:
        return f"{path}: "
  return ""


def _log(msg: str) -> None:
  print(f"[dssgd server {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


def participant_config(cfg):
  """The config a participant builds its plan from: an asynchronous run's
  participants train as the parallel protocol's do (the server decides when
  each one's upload is applied)."""
  return cfg.replace(protocol="parallel") if cfg.protocol == "async" else cfg


def _deployed_plan(cfg):
  from dssgd_jax.run import build  # pylint: disable=g-import-not-at-top
  plan = build.plan(participant_config(cfg))
  return plan.replace(protocol="async") if cfg.protocol == "async" else plan


class Deployment:
  """The server's epoch loop over a Flower ``Grid``."""

  def __init__(self, grid: Grid, cfg, reply_timeout: float,
               connect_timeout: float, server_eval: bool):
    from dssgd_jax.flower import coordinator  # pylint: disable=g-import-not-at-top
    self.grid = grid
    self.cfg = cfg
    self.reply_timeout = reply_timeout
    self.connect_timeout = connect_timeout
    self.co = coordinator.Coordinator(participant_config(cfg))
    self.nodes: dict[int, int] = {}  # participant index -> node id
    self.seen: set[int] = set()  # participants that trained in this process
    self.run_json = participant_config(cfg).to_json()
    self.server_eval = None
    if server_eval:
      self.server_eval = self._server_evaluator()

  def _server_evaluator(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from dssgd_jax import evaluation  # pylint: disable=g-import-not-at-top
    from dssgd_jax.data import load_dataset, preprocess  # pylint: disable=g-import-not-at-top
    cfg = self.cfg
    ds = preprocess(load_dataset(cfg.dataset, source=cfg.data_source,
                                 data_dir=cfg.data_dir),
                    model=cfg.model, standardize=False)
    from dssgd_jax.run import data as data_lib  # pylint: disable=g-import-not-at-top
    test_x, test_y = data_lib.server_test_split(self.co.plan.data, ds)
    ev = evaluation.make_evaluator(self.co.model.apply, self.co.unravel,
                                   test_x, test_y, 1)
    return lambda params: float(np.asarray(ev(jnp.asarray(params)[None]))[0])

  # -- messages --------------------------------------------------------------
  def _send(self, messages: list[Message], timeout: float) -> dict:
    """node id -> reply content of the messages answered in time.

    Pushes the messages and polls for the replies every
    :data:`POLL_S` seconds (``Grid.send_and_receive`` polls every 3 s, which
    would add seconds to every visit of the round-robin protocol). Replies
    are matched to requests by message id: an error reply made by the
    SuperLink has no source node.
    """
    if not messages:
      return {}
    ids = list(self.grid.push_messages(messages))
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)
               if mid}
    out = {}
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
      for r in self.grid.pull_messages(list(pending)):
        node = pending.pop(r.metadata.reply_to_message_id, None)
        if node is None:
          continue
        if r.has_error():
          _log(f"node {node} answered with an error: {r.error.reason}")
          continue
        out[node] = r.content
      if pending:
        time.sleep(POLL_S)
    return out

  def discover(self, wait: float) -> None:
    """Maps participant indices to connected nodes (asks new nodes who
    they are); waits up to ``wait`` seconds for all of them."""
    deadline = time.time() + wait
    while True:
      known = set(self.nodes.values())
      new = [n for n in self.grid.get_node_ids() if n not in known]
      msgs = [Message(RecordDict({wire.CONFIG: wire.config(hello=1)}), n,
                      wire.HELLO) for n in new]
      for node, content in self._send(msgs, min(30.0, max(wait, 5.0))
                                      ).items():
        index = int(content[wire.METRICS]["partition_id"])
        self.nodes[index] = node
      if len(self.nodes) >= self.cfg.num_participants or time.time() > deadline:
        return
      time.sleep(1.0)

  def _train_message(self, index: int, epoch: int, key, state,
                     evaluate: bool):
    idx, values = self.co.download_for(index, key, state)
    content = RecordDict({
        wire.CONFIG: wire.config(epoch=epoch, run=self.run_json,
                                 evaluate=int(evaluate)),
        wire.DOWNLOAD: wire.arrays(indices=idx, values=values)})
    if epoch == 1 or index not in self.seen:
      # The initial model, for a participant that holds none yet (used only
      # then; after a server restart every participant gets it once).
      content[wire.INIT] = wire.arrays(values=self.co.initial)
    down = self.co.num_params if idx is None else len(idx)
    return (Message(content, self.nodes[index], wire.TRAIN,
                    group_id=str(epoch)), down, wire.content_bytes(content))

  def _upload(self, content):
    up = content[wire.UPLOAD]
    return wire.get(up, "indices"), wire.get(up, "values")

  # -- the asynchronous protocol ---------------------------------------------
  def arrivals(self, start: int, epochs: int):
    """Asynchronous DSSGD, event by event: every participant always has one
    training message out; each upload is applied when it arrives, and its
    participant is at once sent its next download from the server as it
    then is. Yields one result per epoch, an epoch being a block of N
    arrivals (:func:`dssgd_jax.protocols.arrivals` replays the recorded
    order in simulation), with each upload's staleness: the uploads of
    others applied between its download and its arrival."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    n = self.cfg.num_participants
    if not hasattr(self, "visits"):
      self.visits = [0] * n
    applied = start * n
    sent_at = {}       # participant -> uploads applied when it was sent
    pending = {}       # message id -> (participant, send time, bytes, down)
    block = self._new_block(n)

    def send(i):
      r = self.visits[i] + 1  # its next training
      key = self.co.visit_download_key(i, r)
      msg, down, nbytes = self._train_message(i, r, key, self.co.state, False)
      ids = list(self.grid.push_messages([msg]))
      if ids and ids[0]:
        pending[ids[0]] = (i, time.time(), nbytes, down)
        sent_at[i] = applied
      else:
        _log(f"participant {i}: its message could not be sent")
        self.nodes.pop(i, None)

    self.discover(0.0)
    for i in sorted(self.nodes):
      send(i)
    last_discovery = time.time()
    while applied < epochs * n:
      if not pending and time.time() - last_discovery > 60.0:
        raise RuntimeError("every participant is gone: no upload for "
                           "60 s")
      got = self.grid.pull_messages(list(pending)) if pending else []
      for r in got:
        entry = pending.pop(r.metadata.reply_to_message_id, None)
        if entry is None:
          continue
        i, _, nbytes, down = entry
        if r.has_error():
          _log(f"participant {i} answered with an error: {r.error.reason}")
          block["lost"][i] = True
          self.nodes.pop(i, None)
          continue
        up = self._take_async(block, i, r.content, down, nbytes)
        if up is None:  # a refusal or an error: it is not sent again
          self.nodes.pop(i, None)
          continue
        self.co.receive([up])
        block["staleness"].append(applied - sent_at[i])
        block["arrivals"].append(i)
        applied += 1
        self.visits[i] += 1
        if applied < epochs * n:
          send(i)
        if applied % n == 0:
          self.co.end_epoch()
          yield self._block_result(block)
          block = self._new_block(n)
      now = time.time()
      for mid, (i, sent, _, _) in list(pending.items()):
        if now - sent > self.reply_timeout:
          _log(f"participant {i} did not upload within "
               f"{self.reply_timeout:.0f} s (lost)")
          del pending[mid]
          block["lost"][i] = True
          self.nodes.pop(i, None)
      if now - last_discovery > 5.0 and len(self.nodes) < n:
        before = set(self.nodes)
        self.discover(0.0)  # participants that came back
        for i in sorted(set(self.nodes) - before):
          send(i)
        last_discovery = now
      if not got:
        time.sleep(POLL_S)

  @staticmethod
  def _new_block(n: int) -> dict:
    return {"loss": [], "uploaded": [], "downloaded": [], "lost": [False] * n,
            "wire_up": [], "wire_down": [], "accuracy": [], "refused": {},
            "errors": {}, "arrivals": [], "staleness": []}

  def _take_async(self, block, i, content, down, nbytes):
    """An arrived reply: its upload, or None for a refusal or an error
    (recorded in the block)."""
    if wire.CONFIG in content.config_records:
      conf = content[wire.CONFIG]
      for what in ("refused", "error"):
        if what in conf:
          block["refused" if what == "refused" else "errors"][i] = str(
              conf[what])
          _log(f"participant {i}: {conf[what]}")
          return None
    idx, val = self._upload(content)
    m = content[wire.METRICS]
    if "loss" in m:
      block["loss"].append(float(m["loss"]))
    block["uploaded"].append(len(idx))
    block["downloaded"].append(down)
    block["wire_down"].append(nbytes)
    block["wire_up"].append(wire.content_bytes(content))
    self.seen.add(i)
    return idx, val

  @staticmethod
  def _block_result(block) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top
    lost = list(block["lost"])  # timed out or failed in this block
    return {"loss": block["loss"] or [np.nan],
            "uploaded": block["uploaded"], "downloaded": block["downloaded"],
            "lost": lost, "wire_up": block["wire_up"],
            "wire_down": block["wire_down"], "accuracy": [],
            "refused": block["refused"], "errors": block["errors"],
            "took_part": len(set(block["arrivals"])),
            "arrivals": list(block["arrivals"]),
            "staleness": list(block["staleness"])}

  def epoch(self, epoch: int, evaluate: bool) -> dict:
    """One epoch of the protocol; returns per-participant results (with
    ``evaluate``, the accuracies the participants report of the models they
    trained, in the same train message)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    n = self.cfg.num_participants
    res = {"loss": [np.nan] * n, "uploaded": [0] * n, "downloaded": [0] * n,
           "lost": [True] * n, "wire_up": [], "wire_down": [],
           "accuracy": [], "refused": {}, "errors": {}, "took_part": 0}
    keys = self.co.download_keys(epoch)

    def take(index, content, down, sent_bytes):
      """The reply of a participant: its upload, or None for a refusal
      (recorded, and counted as a lost upload)."""
      m = content[wire.METRICS]
      self.seen.add(index)
      res["downloaded"][index] = down  # it arrived: the participant answered
      res["wire_down"].append(sent_bytes)
      res["wire_up"].append(wire.content_bytes(content))
      if wire.CONFIG in content.config_records:
        conf = content[wire.CONFIG]
        for what in ("refused", "error"):
          if what in conf:
            reason = str(conf[what])
            res["refused" if what == "refused" else "errors"][index] = reason
            _log(f"epoch {epoch}: participant {index}: {reason}")
            return None
      idx, val = self._upload(content)
      if "loss" in m:
        res["loss"][index] = float(m["loss"])
      res["uploaded"][index] = len(idx)
      res["lost"][index] = False
      res["took_part"] += 1
      if evaluate and "accuracy" in m:
        res["accuracy"].append(float(m["accuracy"]))
      return idx, val

    if self.cfg.protocol == "round_robin":
      for i in range(n):
        if i not in self.nodes:
          continue
        msg, down, nbytes = self._train_message(i, epoch, keys[i],
                                                self.co.state, evaluate)
        got = self._send([msg], self.reply_timeout)
        if self.nodes[i] not in got:
          _log(f"epoch {epoch}: participant {i} did not upload (lost)")
          del self.nodes[i]
          continue
        up = take(i, got[self.nodes[i]], down, nbytes)
        if up is not None:
          self.co.receive([up])
    else:
      snapshot = self.co.state
      sent = {i: self._train_message(i, epoch, keys[i], snapshot,
                                      evaluate)
              for i in range(n) if i in self.nodes}
      got = self._send([m for m, _, _ in sent.values()], self.reply_timeout)
      uploads = [None] * n
      for i, (_, down, nbytes) in sent.items():
        if self.nodes[i] in got:
          uploads[i] = take(i, got[self.nodes[i]], down, nbytes)
        else:
          _log(f"epoch {epoch}: participant {i} did not upload (lost)")
          del self.nodes[i]
      self.co.receive(uploads)
    self.co.end_epoch()
    return res


def run(grid: Grid, cfg, reply_timeout: float = 600.0,
        connect_timeout: float = 120.0, server_eval: bool = True) -> dict:
  """The deployed run: the epoch loop, and what a simulated run writes
  (:mod:`dssgd_jax.run.outputs`: config and plan, metrics, TensorBoard
  events, checkpoints, summary, figures)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dssgd_jax import protocols  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import events as events_lib  # pylint: disable=g-import-not-at-top
  from dssgd_jax.run import outputs  # pylint: disable=g-import-not-at-top
  plan = _deployed_plan(cfg)
  workdir = outputs.prepare_workdir(cfg.workdir)
  outputs.check_resumable(workdir, plan)
  dep = Deployment(grid, cfg, reply_timeout, connect_timeout, server_eval)
  ckpt = os.path.join(workdir, outputs.CHECKPOINT)
  metrics_path = os.path.join(workdir, outputs.METRICS)
  start = 0
  template = {"server": dep.co.state, "aggregation": dep.co.aggregation_state}
  if cfg.protocol == "async":  # each participant's trainings so far
    template["visits"] = np.zeros(cfg.num_participants, np.int32)
  if os.path.exists(ckpt):
    state, start = outputs.load_checkpoint(ckpt, template, dep.co.train_key)
    dep.co.state = state["server"]
    dep.co.aggregation_state = state["aggregation"]
    if "visits" in state:
      dep.visits = np.asarray(state["visits"]).astype(int).tolist()
    _log(f"resuming {workdir} after epoch {start}")
  rows = [r for r in outputs.read_metrics(metrics_path)
          if r["epoch"] <= start]
  outputs.write_json(os.path.join(workdir, outputs.CONFIG),
                     json.dumps(outputs.config_json(plan), indent=2,
                                sort_keys=True))
  outputs.write_lines(metrics_path, rows)
  tb = events_lib.open_writer(workdir, resume_epoch=start)
  dep.discover(connect_timeout)
  _log(f"{len(dep.nodes)} of {cfg.num_participants} participants connected")
  elapsed = rows[-1]["elapsed_s"] if rows else 0.0
  blocks = (dep.arrivals(start, cfg.epochs) if cfg.protocol == "async"
            else None)
  try:
    for epoch in range(start + 1, cfg.epochs + 1):
      t0 = time.time()
      evaluate = outputs.is_eval_epoch(plan, epoch)
      if blocks is not None:
        res = next(blocks)
      else:
        if len(dep.nodes) < cfg.num_participants:
          dep.discover(0.0)  # participants that came back
        res = dep.epoch(epoch, evaluate)
      acc = server_acc = None
      if evaluate:
        acc = np.asarray(res["accuracy"]) if res["accuracy"] else None
        if dep.server_eval is not None:
          server_acc = dep.server_eval(dep.co.state.params)
      # Participants that do not report their loss (the default policy) are
      # left out of the mean: with none, train_loss is null.
      losses = np.asarray([l for l in res["loss"] if np.isfinite(l)])
      stats = protocols.EpochStats(
          losses, np.asarray(res["uploaded"]), np.asarray(res["downloaded"]),
          np.asarray(res["lost"]),
          staleness=(None if "staleness" not in res else
                     np.asarray(res["staleness"])))
      row = {"epoch": epoch}
      row.update(outputs.run_fields(plan, epoch, acc, server_acc, stats))
      if "arrivals" in res:
        row["arrivals"] = res["arrivals"]
      wall = time.time() - t0
      row.update(
          num_models=res["took_part"], num_params=dep.co.num_params,
          missing=[i for i in range(cfg.num_participants)
                   if res["lost"][i] and i not in res["refused"]
                   and i not in res["errors"]],
          refused={str(i): r for i, r in sorted(res["refused"].items())},
          errors={str(i): r for i, r in sorted(res["errors"].items())},
          wire_bytes_up=(float(np.mean(res["wire_up"])) if res["wire_up"]
                         else 0.0),
          wire_bytes_down=(float(np.mean(res["wire_down"]))
                           if res["wire_down"] else 0.0),
          wall_time_s=wall, elapsed_s=elapsed + wall)
      elapsed = row["elapsed_s"]
      rows.append(row)
      outputs.append_metrics(metrics_path, row)
      tb.write(epoch, row)
      saved = {"server": dep.co.state, "aggregation": dep.co.aggregation_state}
      if blocks is not None:
        saved["visits"] = np.asarray(dep.visits, np.int32)
      outputs.save_checkpoint(ckpt, saved, epoch, dep.co.train_key)
      acc_text = ("" if row["participant_accuracy_mean"] is None else
                  f" test acc {row['participant_accuracy_mean']:.4f}")
      loss_text = ("" if row["train_loss"] is None else
                   f" loss {row['train_loss']:.4f}")
      _log(f"epoch {epoch}/{cfg.epochs}{acc_text}{loss_text}"
           f" refused {sorted(res['refused'])}"
           f" missing {row['missing']} wire up {row['wire_bytes_up']:.0f} B "
           f"down {row['wire_bytes_down']:.0f} B per participant "
           f"({wall:.1f}s)")
  finally:
    tb.close()
  summary = outputs.summarize(plan, rows)
  summary["privacy"] = outputs.privacy_note(plan, summary["epochs"])
  summary["deployment"] = "flower"
  outputs.write_json(os.path.join(workdir, outputs.SUMMARY),
                     json.dumps(summary, indent=2))
  outputs.draw_figures(workdir, _log)
  return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
  rc = context.run_config
  cfg = parse_flags(str(rc.get("flags", "")))
  run(grid, cfg, reply_timeout=float(rc.get("reply-timeout", 600)),
      connect_timeout=float(rc.get("connect-timeout", 120)),
      server_eval=bool(rc.get("server-eval", True)))
