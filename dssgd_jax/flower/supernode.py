"""``flower-supernode`` with a short idle poll (``python -m
dssgd_jax.flower.supernode ARGS``, started by ``python -m dssgd_jax.flower
participant``).

Flower 1.42's SuperNode asks the SuperLink for a new message every 3 s when
it has none (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``,
no flag or setting), and checks every 0.5 s whether its app has replied. In
the round-robin protocol a participant is idle until its turn, so each visit
would wait 1.5 s on average before it starts, and a 10-participant epoch 15 s
in polls alone. This entry point runs Flower's own ``flower-supernode`` with
those sleeps shortened (:class:`IdlePolls`: 0.2 s after a message, growing
to 0.6 s while idle; the module's ``time`` replaced by one whose ``sleep``
is shortened, nothing else changes) and with short retries of
a message's objects (:func:`shorten_object_retries`). Each idle poll is one
signed HTTPS request to the SuperLink: cheap for tens of participants.

Three robustness changes, the first two measured at 30 participants on two cores
(``benchmarks/deploy_visits.py``): the SuperLink's SQLite state answers
``500`` ("database is locked") under a burst of requests, which Flower's
client does not retry, so a participant's first ``get-fab`` failed and its
poll loop ended for good; here a 500 is retried like a 503
(:func:`retry_server_errors`), and an error while pulling a message is
logged and the next poll goes on (:func:`keep_polling`); a heartbeat
that fails with an unexpected answer is retried instead of ending the
heartbeat thread for good (:func:`keep_heartbeat`: seen as participants that
never came back after a SuperLink restart on a loaded CI machine).
"""

import sys
import time
import types

POLL_S = 0.2       # the idle poll right after a message
IDLE_POLL_S = 0.6  # ... growing by IDLE_GROWTH per empty poll up to this
IDLE_GROWTH = 1.25
# Flower retries a message's objects not yet in a store after 1 s (doubling
# to 10 s); they are usually there a few milliseconds later.
OBJECT_RETRY_S = (0.01, 0.2)  # first wait, largest wait


def shorten_object_retries() -> None:
  """Makes Flower's object pulls in this process retry after 10 ms (doubling
  up to 0.2 s) instead of 1 s (doubling up to 10 s): the defaults of
  ``pull_objects`` and ``pull_and_inflate_object_from_tree``."""
  from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=g-import-not-at-top
  first, cap = OBJECT_RETRY_S
  for fn in (inflatable_utils.pull_objects,
             inflatable_utils.pull_and_inflate_object_from_tree):
    fn.__kwdefaults__.update(initial_backoff=first, backoff_cap=cap)


def retry_server_errors() -> None:
  """Flower's HTTP retries (exponential backoff) also for ``500``."""
  import httpx  # pylint: disable=g-import-not-at-top
  from flwr.supercore.retry import http_retry  # pylint: disable=g-import-not-at-top
  http_retry._RETRYABLE_STATUS_CODES = frozenset(  # pylint: disable=protected-access
      set(http_retry._RETRYABLE_STATUS_CODES)  # pylint: disable=protected-access
      | {httpx.codes.INTERNAL_SERVER_ERROR})


def keep_heartbeat() -> None:
  """A heartbeat that fails with an unexpected answer is retried (Flower's
  backoff, up to 20 s) instead of ending the heartbeat thread.

  Flower 1.42's SuperNode retries a heartbeat only on a transport error or
  502-504; any other HTTP status (a ``500`` "database is locked" from a busy
  SuperLink, or an answer while a restarted SuperLink is still starting)
  raises out of the thread, which ends silently: the SuperNode keeps polling
  but the SuperLink marks it offline 30-60 s later and the ServerApp, which
  asks for the online nodes, never sees it again. ``401`` still stops the
  SuperNode (Flower sends it SIGINT before raising).
  """
  from logging import WARNING  # pylint: disable=g-import-not-at-top
  from flwr.supercore import heartbeat  # pylint: disable=g-import-not-at-top
  from flwr.supercore import log  # pylint: disable=g-import-not-at-top

  def beat(self) -> None:
    if self._stop_event.is_set():  # pylint: disable=protected-access
      return
    try:
      ok = self.heartbeat_fn()
    except Exception as e:  # pylint: disable=broad-except
      log(WARNING, "Heartbeat failed (%s); retrying.", e)
      raise heartbeat.HeartbeatFailure from e
    if not ok:
      raise heartbeat.HeartbeatFailure

  heartbeat.HeartbeatSender._heartbeat = beat  # pylint: disable=protected-access


def keep_polling(module) -> None:
  """An exception while pulling a message (after Flower's own retries) is
  logged and the loop goes on with its next poll, instead of ending the
  SuperNode's loop (the server counts that message as lost after its reply
  timeout, as for a participant that went away)."""
  from logging import ERROR  # pylint: disable=g-import-not-at-top
  pull = module._pull_and_store_message  # pylint: disable=protected-access

  def pull_or_skip(*args, **kwargs):
    try:
      run_id = pull(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      module.log(ERROR, "Pulling a message failed (%s); polling again.", e)
      return None
    if run_id is not None:
      IdlePolls.reset()
    return run_id

  module._pull_and_store_message = pull_or_skip  # pylint: disable=protected-access


class IdlePolls:
  """The SuperNode's waits: Flower's 3 s idle sleep becomes :data:`POLL_S`
  after a message, growing by :data:`IDLE_GROWTH` per empty poll up to
  :data:`IDLE_POLL_S`; its other sleeps (0.5 s for its app's reply) are
  capped at :data:`POLL_S`. Measured on two cores: thirty participants
  polling every 0.2 s took most of the machine (each poll is a signed HTTP
  request, a few milliseconds of CPU on both sides)."""
  wait = POLL_S

  @classmethod
  def reset(cls) -> None:
    cls.wait = POLL_S

  @classmethod
  def sleep(cls, seconds: float) -> None:
    if float(seconds) >= 3.0:  # Flower's idle poll
      time.sleep(cls.wait)
      cls.wait = min(cls.wait * IDLE_GROWTH, IDLE_POLL_S)
    else:
      time.sleep(min(float(seconds), POLL_S))


def _capped_time():
  return types.SimpleNamespace(
      sleep=IdlePolls.sleep,
      **{name: getattr(time, name) for name in dir(time)
         if not name.startswith("_") and name != "sleep"})


def main(argv=None) -> None:
  from flwr.supernode import start_client_internal  # pylint: disable=g-import-not-at-top
  from flwr.supernode.cli import flower_supernode  # pylint: disable=g-import-not-at-top
  start_client_internal.time = _capped_time()
  shorten_object_retries()
  retry_server_errors()
  keep_polling(start_client_internal)
  keep_heartbeat()
  sys.argv = ["flower-supernode"] + list(sys.argv[1:] if argv is None
                                         else argv)
  flower_supernode()


if __name__ == "__main__":
  main()
