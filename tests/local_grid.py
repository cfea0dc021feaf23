"""An in-process Flower ``Grid`` for tests: the server app's messages are
answered by the client app's own handlers, with real Flower ``Message`` and
``Context`` objects, but no SuperLink, SuperNode or process per message.

``LocalGrid(node_configs)`` holds one ``Context`` per node id (its node
config, as ``flower-supernode --node-config`` would give it). A pushed
message is answered when the server pulls it; ``hold`` keeps chosen nodes'
replies back (a slow participant), ``release`` lets them arrive, and
``offline`` makes nodes vanish (their messages are never answered).
"""

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dssgd_jax.flower import client_app
from dssgd_jax.flower import wire

RUN_ID = 1
SERVER_NODE_ID = 1  # the SuperLink's node id, which the server app sends as


class LocalGrid:
  """``get_node_ids``, ``push_messages``, ``pull_messages``, as Flower's."""

  def __init__(self, node_configs: dict[int, dict], one_at_a_time=None):
    """``one_at_a_time``: a ``random.Random``; then each pull answers one
    pending message, chosen with it (participants of random speeds)."""
    self.rng = one_at_a_time
    self.contexts = {
        nid: Context(run_id=RUN_ID, node_id=nid, node_config=dict(conf),
                     state=RecordDict(), run_config={})
        for nid, conf in node_configs.items()}
    self.pending: dict[str, Message] = {}
    self.offline: set[int] = set()
    self.held: set[int] = set()
    self.log: list[tuple[int, str]] = []  # (node, message type) answered
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 0

  def get_node_ids(self):
    return [n for n in self.contexts if n not in self.offline]

  def push_messages(self, messages):
    ids = []
    for m in messages:
      m.metadata.__dict__["_message_id"] = m.object_id
      self.pending[m.metadata.message_id] = m
      ids.append(m.metadata.message_id)
    return ids

  def _answer(self, m: Message) -> Message:
    node = m.metadata.dst_node_id
    TaskIdentity.node_id = node
    TaskIdentity.task_id = len(self.log) + 1
    handler = {wire.TRAIN: client_app.train,
               wire.HELLO: client_app.hello}[m.metadata.message_type]
    try:
      reply = handler(m, self.contexts[node])
    finally:
      TaskIdentity.node_id, TaskIdentity.task_id = SERVER_NODE_ID, 0
    self.log.append((node, m.metadata.message_type))
    return reply

  def pull_messages(self, message_ids):
    out = []
    message_ids = list(message_ids)
    if self.rng is not None:
      ready = [m for m in message_ids if m in self.pending and
               self.pending[m].metadata.dst_node_id not in
               self.offline | self.held]
      message_ids = [self.rng.choice(ready)] if ready else []
    for mid in message_ids:
      m = self.pending.get(mid)
      if m is None:
        continue
      node = m.metadata.dst_node_id
      if node in self.offline or node in self.held:
        continue
      del self.pending[mid]
      out.append(self._answer(m))
    return out
