"""``flower-supernode`` with a short idle poll (``python -m
dssgd_jax.flower.supernode ARGS``, started by ``python -m dssgd_jax.flower
participant``).

Flower 1.42's SuperNode asks the SuperLink for a new message every 3 s when
it has none (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``,
no flag or setting), and checks every 0.5 s whether its app has replied. In
the round-robin protocol a participant is idle until its turn, so each visit
would wait 1.5 s on average before it starts, and a 10-participant epoch 15 s
in polls alone. This entry point runs Flower's own ``flower-supernode`` with
those sleeps capped at :data:`POLL_S` = 0.2 s (the module's ``time`` replaced by one
whose ``sleep`` is capped; nothing else changes) and with short retries of
a message's objects (:func:`shorten_object_retries`). Each idle poll is one
signed HTTPS request to the SuperLink: cheap for tens of participants.
"""

import sys
import time
import types

POLL_S = 0.2
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


def _capped_time(cap: float):
  return types.SimpleNamespace(
      sleep=lambda s: time.sleep(min(float(s), cap)),
      **{name: getattr(time, name) for name in dir(time)
         if not name.startswith("_") and name != "sleep"})


def main(argv=None) -> None:
  from flwr.supernode import start_client_internal  # pylint: disable=g-import-not-at-top
  from flwr.supernode.cli import flower_supernode  # pylint: disable=g-import-not-at-top
  start_client_internal.time = _capped_time(POLL_S)
  shorten_object_retries()
  sys.argv = ["flower-supernode"] + list(sys.argv[1:] if argv is None
                                         else argv)
  flower_supernode()


if __name__ == "__main__":
  main()
