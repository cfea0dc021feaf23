"""The SuperNode entry point's changes to Flower 1.42 (dssgd_jax.flower.supernode):
idle polls, retried 500s, polling on after a failed pull, a heartbeat that
survives an unexpected answer. Each is checked on Flower's own objects,
restored after the test."""

import threading
import time
import types

import pytest

pytest.importorskip("flwr")
import httpx  # pylint: disable=g-import-not-at-top
from flwr.supercore import heartbeat  # pylint: disable=g-import-not-at-top
from flwr.supercore.retry import http_retry  # pylint: disable=g-import-not-at-top

from dssgd_jax.flower import supernode  # pylint: disable=g-import-not-at-top


def _status_error(code):
  request = httpx.Request("POST", "https://127.0.0.1/v1/fleet/heartbeat")
  return httpx.HTTPStatusError(
      "busy", request=request, response=httpx.Response(code, request=request))


def test_a_heartbeat_answered_with_500_is_retried_not_ended(monkeypatch):
  monkeypatch.setattr(heartbeat.HeartbeatSender, "_heartbeat",
                      heartbeat.HeartbeatSender._heartbeat)  # restored after
  supernode.keep_heartbeat()
  calls, second = [], threading.Event()

  def beat():
    calls.append(time.time())
    if len(calls) == 1:
      raise _status_error(500)  # "database is locked"
    second.set()
    return True

  sender = heartbeat.HeartbeatSender(beat)
  sender.start()
  try:
    # Flower's backoff waits up to 1 s before the first retry.
    assert second.wait(timeout=10), "the heartbeat thread ended"
    assert sender.is_running
  finally:
    sender.stop()
  assert len(calls) >= 2 and 0 < calls[1] - calls[0] <= 5  # a backoff wait


def test_a_failed_pull_is_logged_and_polling_goes_on(monkeypatch):
  logged = []
  answers = iter([RuntimeError("object not found"), None, 7])

  def pull(**kwargs):
    a = next(answers)
    if isinstance(a, Exception):
      raise a
    return a

  module = types.SimpleNamespace(_pull_and_store_message=pull,
                                 log=lambda *a: logged.append(a))
  supernode.keep_polling(module)
  monkeypatch.setattr(supernode.IdlePolls, "wait", supernode.IDLE_POLL_S)
  assert module._pull_and_store_message(state=None) is None
  assert "object not found" in str(logged[0])
  assert module._pull_and_store_message(state=None) is None  # no message
  assert supernode.IdlePolls.wait == supernode.IDLE_POLL_S
  assert module._pull_and_store_message(state=None) == 7
  assert supernode.IdlePolls.wait == supernode.POLL_S  # a message: poll soon


def test_idle_polls_grow_to_their_cap_and_other_waits_are_capped(monkeypatch):
  slept = []
  monkeypatch.setattr(supernode.time, "sleep", slept.append)
  monkeypatch.setattr(supernode.IdlePolls, "wait", supernode.POLL_S)
  for _ in range(8):
    supernode.IdlePolls.sleep(3)  # Flower's idle poll
  expected = [min(supernode.POLL_S * supernode.IDLE_GROWTH**k,
                  supernode.IDLE_POLL_S) for k in range(8)]
  assert slept == pytest.approx(expected)
  assert slept[-1] == supernode.IDLE_POLL_S
  slept.clear()
  supernode.IdlePolls.sleep(0.5)  # waiting for its app's reply
  supernode.IdlePolls.sleep(0.05)
  assert slept == [supernode.POLL_S, 0.05]


def test_a_500_is_retried_like_a_503(monkeypatch):
  monkeypatch.setattr(http_retry, "_RETRYABLE_STATUS_CODES",
                      http_retry._RETRYABLE_STATUS_CODES)
  assert httpx.codes.INTERNAL_SERVER_ERROR not in (
      http_retry._RETRYABLE_STATUS_CODES)
  supernode.retry_server_errors()
  assert {httpx.codes.INTERNAL_SERVER_ERROR,
          httpx.codes.SERVICE_UNAVAILABLE} <= (
              http_retry._RETRYABLE_STATUS_CODES)


def test_a_task_that_fails_outside_the_app_does_not_end_serving(monkeypatch):
  """A failed task (its message's objects never reached the SuperNode: the
  SuperLink went away mid-transfer) is one warning; the next task is
  served. Before, the serving thread ended and the participant stayed
  connected without ever answering again."""
  from dssgd_jax.flower import executor  # pylint: disable=g-import-not-at-top
  stop = threading.Event()
  task = types.SimpleNamespace(HasField=lambda name: True, token="t")

  class FakeSuperNode:
    def AcquireTask(self, request):  # pylint: disable=invalid-name
      return task

    def close(self):
      pass

  handled, warned = [], []

  def handle_task(address, token, handler):
    handled.append(token)
    if len(handled) == 1:
      raise RuntimeError("Failed to pull object: timeout or retry limit")
    stop.set()
    return "train", 0.0

  monkeypatch.setattr(executor, "_client", lambda *a, **k: FakeSuperNode())
  monkeypatch.setattr(executor, "handle_task", handle_task)
  thread = threading.Thread(target=executor.serve, args=(
      "127.0.0.1:1", None, stop), kwargs=dict(warn=warned.append))
  thread.start()
  thread.join(timeout=10)
  assert not thread.is_alive()
  assert handled == ["t", "t"]  # served on after the failure
  assert len(warned) == 1 and "Failed to pull object" in warned[0]
  assert "serving the next one" in warned[0]
