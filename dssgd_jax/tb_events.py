"""TensorBoard event files without TensorFlow (SPEC section 6: "TensorBoard-
readable events").

:func:`make_writer` returns a ``writer(step, row)`` that appends one scalar
summary per numeric field of a metrics row to ``workdir/events/``, in the
format TensorBoard reads: TFRecord framing (little-endian length, masked
CRC-32C of the length, the payload, masked CRC-32C of the payload) around
hand-encoded ``tensorflow.Event`` protocol buffers holding a ``Summary`` of
``simple_value`` scalars. Nothing here needs TensorFlow or the ``tensorboard``
package; :func:`read_scalars` reads the files back (checking every CRC) so the
format is testable offline, and ``tensorboard --logdir=WORKDIR/events`` shows
the curves wherever TensorBoard is installed.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> write = make_writer(d)
>>> write(1, {"epoch": 1, "participant_accuracy_mean": 0.5, "note": "x"})
>>> [(s.step, s.tag, round(s.value, 3)) for s in read_scalars(d)]
[(1, 'participant_accuracy_mean', 0.5)]

The protobuf field numbers come from TensorFlow's ``event.proto`` (Event:
wall_time = 1 double, step = 2 int64, file_version = 3 string, summary = 5)
and ``summary.proto`` (Summary: value = 1 repeated; Value: tag = 1 string,
simple_value = 2 float).
"""

import glob
import os
import socket
import struct
import time
from typing import Any, Callable, Iterator, NamedTuple

EVENTS_DIR = "events"
FILE_VERSION = b"brain.Event:2"

# ----------------------------------------------------------------------------
# CRC-32C (Castagnoli), as used by TFRecord, and its "masked" form.

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)
del _i, _c


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data``.

  >>> hex(crc32c(b"123456789"))
  '0xe3069283'
  """
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
  """One TFRecord: length, CRC of the length, payload, CRC of the payload."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload +
          struct.pack("<I", masked_crc32c(payload)))


# ----------------------------------------------------------------------------
# Minimal protobuf encoding of Event / Summary / Summary.Value.


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 is encoded as its two's complement
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def encode_scalar_event(step: int, scalars: dict[str, float],
                        wall_time: float) -> bytes:
  """An ``Event`` proto holding a ``Summary`` with one simple_value per tag."""
  summary = b"".join(
      _length_delimited(1, _length_delimited(1, tag.encode("utf-8")) +
                        _key(2, 5) + struct.pack("<f", float(value)))
      for tag, value in scalars.items())
  return (_key(1, 1) + struct.pack("<d", wall_time) +
          _key(2, 0) + _varint(int(step)) + _length_delimited(5, summary))


def encode_file_version_event(wall_time: float) -> bytes:
  """The first event of every file: ``file_version = "brain.Event:2"``."""
  return (_key(1, 1) + struct.pack("<d", wall_time) +
          _length_delimited(3, FILE_VERSION))


# ----------------------------------------------------------------------------
# Writer.


def _scalars(row: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in row.items():
    if k == "epoch" or isinstance(v, bool) or v is None:
      continue
    if isinstance(v, (int, float)):
      out[k] = float(v)
  return out


class EventWriter:
  """Appends scalar summaries to one event file, created on first write.

  Every write is flushed, so a running experiment can be watched live and a
  kill loses at most the event being written (TensorBoard stops at a torn
  last record).
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self.path = None

  def _open_path(self, now: float) -> str:
    os.makedirs(self.logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(now):010d}."
            f"{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}")
    path = os.path.join(self.logdir, name)
    with open(path, "wb") as f:
      f.write(frame_record(encode_file_version_event(now)))
    return path

  def write_scalars(self, step: int, scalars: dict[str, float],
                    wall_time: float | None = None) -> None:
    now = time.time() if wall_time is None else wall_time
    if self.path is None:
      self.path = self._open_path(now)
    with open(self.path, "ab") as f:
      f.write(frame_record(encode_scalar_event(step, scalars, now)))
      f.flush()

  def __call__(self, step: int, row: dict[str, Any]) -> None:
    """Writes every numeric field of ``row`` (but ``epoch``) at ``step``."""
    scalars = _scalars(row)
    if scalars:
      self.write_scalars(step, scalars)


def make_writer(workdir: str) -> Callable[[int, dict[str, Any]], None]:
  """A ``writer(step, row_dict)`` writing scalars into ``workdir/events/``."""
  return EventWriter(os.path.join(workdir, EVENTS_DIR))


# ----------------------------------------------------------------------------
# Reader (for tests and for users without TensorBoard).


class Scalar(NamedTuple):
  wall_time: float
  step: int
  tag: str
  value: float


def read_records(path: str) -> Iterator[bytes]:
  """Payloads of the TFRecords in ``path``; stops at a torn last record.

  Raises:
    ValueError: a CRC does not match (a corrupt, not merely truncated, file).
  """
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if crc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    end = pos + 12 + length + 4
    if end > len(data):
      return  # torn last record
    payload = data[pos + 12:pos + 12 + length]
    (crc,) = struct.unpack("<I", data[end - 4:end])
    if crc != masked_crc32c(payload):
      raise ValueError(f"{path}: bad payload CRC at byte {pos}")
    yield payload
    pos = end


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of a protobuf message; value is an int
  for varints, bytes for length-delimited and fixed fields."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def decode_event(payload: bytes) -> list[Scalar]:
  """The simple_value scalars of one encoded ``Event`` (empty if none)."""
  wall_time, step, out = 0.0, 0, []
  values = []
  for field, wire, value in _fields(payload):
    if field == 1 and wire == 1:
      (wall_time,) = struct.unpack("<d", value)
    elif field == 2 and wire == 0:
      step = value - (1 << 64) if value >= 1 << 63 else value
    elif field == 5 and wire == 2:
      for f2, w2, v2 in _fields(value):
        if f2 == 1 and w2 == 2:
          values.append(v2)
  for v in values:
    tag, simple = None, None
    for f3, w3, v3 in _fields(v):
      if f3 == 1 and w3 == 2:
        tag = v3.decode("utf-8")
      elif f3 == 2 and w3 == 5:
        (simple,) = struct.unpack("<f", v3)
    if tag is not None and simple is not None:
      out.append(Scalar(wall_time, step, tag, simple))
  return out


def event_files(path: str) -> list[str]:
  """Event files under ``path`` (a file, an events dir or a run workdir)."""
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(os.path.join(path, EVENTS_DIR)):
    path = os.path.join(path, EVENTS_DIR)
  files = glob.glob(os.path.join(path, "*tfevents*"))
  return sorted(files, key=lambda f: (os.path.getmtime(f), f))


def read_scalars(path: str) -> list[Scalar]:
  """Every scalar in the event files under ``path``, in file order.

  Files are read oldest first (by modification time, then name), so a
  resumed run's events come after the first run's.
  """
  out = []
  for f in event_files(path):
    for payload in read_records(f):
      out.extend(decode_event(payload))
  return out
