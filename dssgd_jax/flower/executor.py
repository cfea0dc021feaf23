"""A participant's long-lived app process: every message in one warm process.

Flower 1.42's SuperNode hands each message to a *task*, and its own executor
(``flower-superexec``) starts a fresh ``flwr-clientapp`` process for every
task: Python, Flower, JAX and this package imported again, the model's
programs traced again, the data reloaded. Measured on the 2-core build
machine, that is most of a visit's seconds (docs/deployment.md, "Fast
visits"). With ``flower-supernode --isolation process`` the SuperNode starts
no executor and waits for one to ask for tasks on its local runtime API;
:func:`serve` is that executor, in the participant's own process, where JAX
is imported once, the model compiled once, and the participant's data and
state stay in memory between visits. Each task is handled as
``flwr-clientapp`` handles it (``pull_task_input``, the ClientApp's handler,
``push_message``, ``push_task_output``: Flower's own functions), by the
ClientApp's handlers (:mod:`.client_app`).

These are Flower's internal modules (``flwr.supernode.runtime``,
``flwr.supercore``): the package pins ``flwr==1.42.*``, and
tests/test_flower_deploy.py runs this path end to end.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

# How often an idle executor asks its SuperNode for a task: every POLL_S
# seconds after a task, the wait growing by IDLE_GROWTH per empty answer up to
# IDLE_POLL_S (an idle participant costs little CPU; a busy one answers fast).
POLL_S = 0.05
IDLE_POLL_S = 0.25
IDLE_GROWTH = 1.25
HEARTBEAT_S = 10.0  # a task's token expires after 60 s without one


def _client(address: str, component: str, token: str | None = None):
  from flwr.supercore.interceptors import (  # pylint: disable=g-import-not-at-top
      RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor)
  from flwr.supercore.retry import make_simple_http_retry_invoker  # pylint: disable=g-import-not-at-top
  from flwr.supercore.runtime import RuntimeHttpClient  # pylint: disable=g-import-not-at-top
  interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
  if token is not None:
    interceptors.append(RuntimeTokenHttpInterceptor(token))
  return RuntimeHttpClient.from_server_address(
      server_address=address, insecure=True, root_certificates=None,
      interceptors=interceptors,
      retry_invoker=make_simple_http_retry_invoker())


def _heartbeats(client, stop: threading.Event) -> threading.Thread:
  """Keeps a long task's token alive (the SuperNode drops a token after
  60 s without a heartbeat); errors end the thread, not the process."""
  from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=g-import-not-at-top

  def beat():
    while not stop.wait(HEARTBEAT_S):
      try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
      except Exception:  # pylint: disable=broad-except
        return

  t = threading.Thread(target=beat, daemon=True)
  t.start()
  return t


def pull_task_input(client):
  """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short
  retry: Flower's waits 1 s (doubling up to 10 s) when the message's objects
  are not in the SuperNode's store yet, which they often are not the moment
  a task is acquired; this one retries after 10 ms (doubling up to 0.2 s).

  Returns:
    (message, context).
  """
  from flwr.common.serde import context_from_proto  # pylint: disable=g-import-not-at-top
  from flwr.app import Message  # pylint: disable=g-import-not-at-top
  from flwr.proto.node_pb2 import Node  # pylint: disable=g-import-not-at-top,no-name-in-module
  from flwr.proto.runtime_pb2 import (  # pylint: disable=g-import-not-at-top,no-name-in-module
      PullAppMessagesRequest, PullTaskInputRequest)
  from flwr.supercore.inflatable.inflatable_protobuf_utils import (  # pylint: disable=g-import-not-at-top
      make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
  from flwr.supercore.inflatable.inflatable_utils import (  # pylint: disable=g-import-not-at-top
      pull_and_inflate_object_from_tree)
  from flwr.supercore.task_identity import TaskIdentity  # pylint: disable=g-import-not-at-top
  res = client.PullTaskInput(PullTaskInputRequest())
  TaskIdentity.task_id = res.task_id
  TaskIdentity.run_id = res.run.run_id
  TaskIdentity.node_id = res.context.node_id
  context = context_from_proto(res.context)
  msgs = client.PullMessages(PullAppMessagesRequest())
  if not msgs.messages_list:
    raise RuntimeError("No messages received from Runtime API")
  node = Node(node_id=context.node_id)
  tree = msgs.message_object_trees[0]
  message = pull_and_inflate_object_from_tree(
      tree, make_pull_object_fn_protobuf(client.PullObject, node,
                                         context.run_id),
      make_confirm_message_received_fn_protobuf(
          client.ConfirmMessageReceived, node, context.run_id),
      return_type=Message, initial_backoff=0.01, backoff_cap=0.2)
  message.metadata.__dict__["_message_id"] = tree.object_id
  return message, context


def handle_task(address: str, token: str,
                handler: Callable) -> tuple[str, float]:
  """Runs one task: its message through ``handler(message, context) ->
  reply``; returns (the message type, seconds in the handler)."""
  from flwr.app import Message  # pylint: disable=g-import-not-at-top
  from flwr.app.error import Error  # pylint: disable=g-import-not-at-top
  from flwr.common.constant import ErrorCode, SubStatus  # pylint: disable=g-import-not-at-top
  from flwr.supernode.runtime import run_clientapp  # pylint: disable=g-import-not-at-top
  client = _client(address, "flwr-clientapp", token)
  stop = threading.Event()
  beat = _heartbeats(client, stop)
  context = None
  kind, busy = "?", 0.0
  try:
    message, context = pull_task_input(client)
    kind = message.metadata.message_type
    t0 = time.perf_counter()
    try:
      reply = handler(message, context)
      status, details = SubStatus.COMPLETED, ""
    except Exception as e:  # pylint: disable=broad-except
      reason = f"{type(e).__name__}: {e}"
      reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                            reason=reason), reply_to=message)
      status, details = SubStatus.FAILED, reason
    busy = time.perf_counter() - t0
    run_clientapp.push_message(client, reply, context)
    run_clientapp.push_task_output(client, context, status, details)
  finally:
    stop.set()
    beat.join(timeout=1.0)
    client.close()
  return kind, busy


def serve(address: str, handler: Callable, stop: threading.Event,
          log: Callable[[str], None] | None = None,
          poll_s: float = POLL_S, idle_poll_s: float = IDLE_POLL_S,
          child=None, warn: Callable[[str], None] | None = None) -> None:
  """Asks the SuperNode at ``address`` (its local runtime API) for tasks
  and handles each in this process, until ``stop`` is set.

  Args:
    address: the SuperNode's ``--host:--port``.
    handler: ``(message, context) -> reply message``.
    stop: set it to end the loop.
    log: one line per task (message type and seconds), or None.
    poll_s, idle_poll_s: the wait between two requests while the SuperNode
      has no task: ``poll_s`` after a task, growing to ``idle_poll_s``.
    child: the SuperNode's process, if this process started it: serving
      ends when it does.
    warn: one line for a task that failed outside the handler (default:
      printed to stderr); serving goes on with the next task.
  """
  if warn is None:
    warn = lambda msg: print(f"[dssgd executor] {msg}", file=sys.stderr,
                             flush=True)
  from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=g-import-not-at-top
  from flwr.supercore.constant import TaskType  # pylint: disable=g-import-not-at-top
  client = _client(address, "SuperExec")
  request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
  wait = poll_s
  try:
    while not stop.is_set() and (child is None or child.poll() is None):
      try:
        res = client.AcquireTask(request)
      except Exception:  # pylint: disable=broad-except
        # The SuperNode is starting or restarting: ask again.
        stop.wait(0.5)
        continue
      if res.HasField("task") and res.token:
        t0 = time.perf_counter()
        try:
          kind, busy = handle_task(address, res.token, handler)
        except Exception as e:  # pylint: disable=broad-except
          # Outside the app (its errors are replies): e.g. the message's
          # objects never reached the SuperNode because the SuperLink went
          # away mid-transfer; the SuperNode fails that task itself. One
          # failed task must not end serving: the participant would stay
          # connected and never answer again.
          warn(f"a task failed before its reply was sent "
               f"({type(e).__name__}: {e}); serving the next one.")
          continue
        if log is not None:
          log(f"{kind} message handled in {time.perf_counter() - t0:.2f}s "
              f"({busy:.2f}s computing)")
        wait = poll_s
      else:
        stop.wait(wait)
        wait = min(wait * IDLE_GROWTH, idle_poll_s)
  finally:
    client.close()
