"""TensorBoard event files without TensorFlow: scalars written, and read back.

An event file is a sequence of TFRecords (little-endian uint64 length, masked
CRC32C of the length, the payload, masked CRC32C of the payload) whose payloads
are `Event` protobufs (tensorflow/core/util/event.proto):

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

The few fields a scalar needs are encoded by hand here, so every run can write
events TensorBoard reads (`tensorboard --logdir runs/`) with no extra package.
`read_scalars` decodes what `ScalarWriter` wrote (and any event file's scalars).

Example:
  >>> import tempfile
  >>> folder = tempfile.mkdtemp()
  >>> writer = ScalarWriter(folder)
  >>> writer.write_scalars(3, {"accuracy": 0.75, "note": "skipped: not a number"})
  >>> read_scalars(folder)
  {'accuracy': [(3, 0.75)]}
"""

from __future__ import annotations

import glob
import math
import os
import socket
import struct
import time

FOLDER = "tensorboard"  # a run's event files: <workdir>/tensorboard/
_FILE_VERSION = b"brain.Event:2"
_CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`.

  >>> hex(crc32c(b"123456789"))  # the standard check value
  '0xe3069283'
  """
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  """The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
  """One TFRecord holding `payload`."""
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", masked_crc(length)) + payload
          + struct.pack("<I", masked_crc(payload)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 negatives as two's complement, as protobuf does
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2) + _varint(len(data)) + data


def encode_event(wall_time: float, *, step: int = 0, scalars: dict | None = None,
                 file_version: bytes | None = None) -> bytes:
  """An `Event` protobuf: a file-version header, or a step's scalar summary."""
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version)
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
        for tag, v in scalars.items())
    out += _bytes_field(5, values)
  return out


def scalar_values(row: dict) -> dict:
  """The entries of a metrics row TensorBoard can plot: finite numbers, not bools."""
  return {k: float(v) for k, v in row.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class ScalarWriter:
  """Appends scalar events to one new event file in `folder` (created if absent).

  `write_scalars(step, dict)` mirrors `fedsim.io.MetricWriter`: a metrics row
  becomes one event whose values are the row's finite numbers. Each event is
  flushed when written, so a killed run leaves every completed row readable.
  """

  def __init__(self, folder: str):
    os.makedirs(folder, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(folder, name)
    self._append(encode_event(time.time(), file_version=_FILE_VERSION))

  def _append(self, event: bytes) -> None:
    with open(self.path, "ab") as f:
      f.write(frame(event))

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = scalar_values(scalars)
    if values:
      self._append(encode_event(time.time(), step=step, scalars=values))


def open_run_events(workdir: str, history: list[dict]) -> ScalarWriter:
  """A run's event writer: older event files removed, `history`'s rows written again.

  A resumed run keeps the metrics rows of the rounds it resumes after (its
  `MetricWriter.history`); its events then say exactly what metrics.jsonl says.
  """
  folder = os.path.join(workdir, FOLDER)
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    os.remove(path)
  writer = ScalarWriter(folder)
  for row in history:
    writer.write_scalars(row["round"], {k: v for k, v in row.items() if k != "round"})
  return writer


# ---------------------------------------------------------------------------- reading


def read_records(path: str) -> list[bytes]:
  """The payloads of a TFRecord file; ValueError on a bad checksum.

  A record cut short at the end (a write interrupted) is dropped.
  """
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if crc != masked_crc(header):
      raise ValueError(f"{path}: bad length checksum at byte {pos}")
    end = pos + 12 + length + 4
    if end > len(data):
      break
    payload = data[pos + 12:pos + 12 + length]
    if struct.unpack("<I", data[end - 4:end])[0] != masked_crc(payload):
      raise ValueError(f"{path}: bad data checksum at byte {pos}")
    records.append(payload)
    pos = end
  return records


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def decode_fields(data: bytes) -> list[tuple[int, int, object]]:
  """A protobuf message as `(field number, wire type, raw value)` triples."""
  out, pos = [], 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(data, pos)
    elif wire == 1:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire == 2:
      size, pos = _read_varint(data, pos)
      value, pos = data[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = data[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    out.append((number, wire, value))
  return out


def decode_event(payload: bytes) -> dict:
  """`{"wall_time", "step", "file_version", "scalars": {tag: value}}` of one Event."""
  event = {"wall_time": None, "step": 0, "file_version": None, "scalars": {}}
  for number, _, value in decode_fields(payload):
    if number == 1:
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif number == 2:
      event["step"] = value - (1 << 64) if value >= 1 << 63 else value
    elif number == 3:
      event["file_version"] = value.decode()
    elif number == 5:
      for n, _, raw in decode_fields(value):
        if n != 1:
          continue
        fields = {f: v for f, _, v in decode_fields(raw)}
        if 1 in fields and 2 in fields:
          event["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return event


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the event files in `folder`: `{tag: [(step, value), ...]}`."""
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    for payload in read_records(path):
      event = decode_event(payload)
      for tag, value in event["scalars"].items():
        out.setdefault(tag, []).append((event["step"], value))
  return out
