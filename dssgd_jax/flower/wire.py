"""What goes over the wire: Flower records <-> numpy arrays, and their size.

Message types and record names shared by :mod:`.server_app` and
:mod:`.client_app`. A download is ``values`` (and ``indices`` unless it is the
whole vector); an upload is ``indices`` and ``values`` of its valid entries
only; everything else is a few numbers. Nothing else leaves a participant.
"""

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Message types (Flower's built-in ones, so the ClientApp's decorators apply).
HELLO = "query"  # who are you (partition id, stored epochs)
TRAIN = "train"  # download -> local epoch -> upload (-> its accuracy)

CONFIG = "config"
DOWNLOAD = "download"
INIT = "init"
UPLOAD = "upload"
METRICS = "metrics"


def arrays(**named: np.ndarray | None) -> ArrayRecord:
  """An ArrayRecord of the given numpy arrays (None ones left out)."""
  return ArrayRecord({k: Array(np.ascontiguousarray(v))
                      for k, v in named.items() if v is not None})


def get(record: ArrayRecord, name: str) -> np.ndarray | None:
  return record[name].numpy() if name in record else None


def config(**values) -> ConfigRecord:
  """A ConfigRecord; dicts are sent as JSON text, None values left out."""
  return ConfigRecord({k: json.dumps(v) if isinstance(v, dict) else v
                       for k, v in values.items() if v is not None})


def metrics(**values) -> MetricRecord:
  """A MetricRecord of numbers (None values left out)."""
  return MetricRecord({k: v for k, v in values.items() if v is not None})


def content_bytes(content: RecordDict) -> int:
  """Bytes of ``content`` as Flower serializes it for the wire: every
  nested object (records, arrays, their chunks) deflated, as the SuperLink
  stores and forwards them. gRPC and TLS framing are not counted.
  """
  try:
    from flwr.supercore.inflatable.inflatable_object import (  # pylint: disable=g-import-not-at-top
        get_all_nested_objects)
    return int(sum(len(o.deflate())
                   for o in get_all_nested_objects(content).values()))
  except ImportError:  # another Flower layout: count the arrays' bytes
    total = 0
    for record in content.array_records.values():
      total += sum(len(a.data) for a in record.values())
    return total
