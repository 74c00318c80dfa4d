"""TensorBoard event files written without TensorFlow read back: framing, values, steps."""

import os
import struct

import numpy as np
import pytest

from fedsim import tensorboard


def test_crc32c_and_masking_match_known_values():
  assert tensorboard.crc32c(b"") == 0
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA    # RFC 3720 B.4: 32 zero bytes
  # TFRecord's mask: rotate right by 15, add 0xa282ead8 (mod 2^32)
  crc = tensorboard.crc32c(b"abc")
  assert tensorboard.masked_crc(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def test_scalars_round_trip_with_their_steps(tmp_path):
  folder = os.fspath(tmp_path / "tb")
  writer = tensorboard.ScalarWriter(folder)
  rows = {1: {"loss": 1.25, "accuracy": 0.5, "epsilon": None, "cohort_size": 3},
          3: {"loss": 0.75, "accuracy": 0.625, "epsilon": 2.5, "flag": True},
          2**40: {"loss": float("nan"), "accuracy": 1.0}}
  for step, row in rows.items():
    writer.write_scalars(step, row)
  back = tensorboard.read_scalars(folder)
  assert back == {"loss": [(1, 1.25), (3, 0.75)],
                  "accuracy": [(1, 0.5), (3, 0.625), (2**40, 1.0)],
                  "cohort_size": [(1, 3.0)], "epsilon": [(3, 2.5)]}
  records = tensorboard.read_records(writer.path)
  assert tensorboard.decode_event(records[0])["file_version"] == "brain.Event:2"
  assert len(records) == 1 + len(rows)


def test_values_are_float32_and_steps_may_be_negative(tmp_path):
  writer = tensorboard.ScalarWriter(os.fspath(tmp_path))
  writer.write_scalars(-5, {"x": 0.1})
  ((step, value),) = tensorboard.read_scalars(os.fspath(tmp_path))["x"]
  assert step == -5 and value == float(np.float32(0.1))


def test_corruption_is_detected_and_a_cut_last_record_dropped(tmp_path):
  writer = tensorboard.ScalarWriter(os.fspath(tmp_path))
  writer.write_scalars(1, {"a": 1.0})
  writer.write_scalars(2, {"a": 2.0})
  data = open(writer.path, "rb").read()
  open(writer.path, "wb").write(data[:-3])  # the last write cut short
  assert tensorboard.read_scalars(os.fspath(tmp_path)) == {"a": [(1, 1.0)]}
  flipped = bytearray(data)
  flipped[-6] ^= 0xFF  # inside the last payload
  open(writer.path, "wb").write(bytes(flipped))
  with pytest.raises(ValueError, match="bad data checksum"):
    tensorboard.read_records(writer.path)


def test_a_resumed_run_rewrites_its_events_from_the_kept_rows(tmp_path):
  workdir = os.fspath(tmp_path)
  first = tensorboard.open_run_events(workdir, [])
  for r in (1, 2, 3):
    first.write_scalars(r, {"accuracy": r / 10})
  kept = [{"round": 1, "accuracy": 0.1}, {"round": 2, "accuracy": 0.2}]
  resumed = tensorboard.open_run_events(workdir, kept)  # resumed after round 2
  resumed.write_scalars(3, {"accuracy": 0.35})
  back = tensorboard.read_scalars(os.path.join(workdir, tensorboard.FOLDER))
  np.testing.assert_allclose([v for _, v in back["accuracy"]], [0.1, 0.2, 0.35], rtol=1e-7)
  assert [s for s, _ in back["accuracy"]] == [1, 2, 3]


def test_the_framing_is_what_tensorflow_reads():
  # Record = uint64 length, masked crc of it, payload, masked crc of the payload.
  payload = b"hello"
  record = tensorboard.frame(payload)
  assert struct.unpack("<Q", record[:8])[0] == 5 and record[12:17] == payload
  assert struct.unpack("<I", record[8:12])[0] == tensorboard.masked_crc(record[:8])
  assert struct.unpack("<I", record[17:])[0] == tensorboard.masked_crc(payload)


def test_tensorboards_own_reader_reads_our_files(tmp_path):
  loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboard.util import tensor_util  # pylint: disable=import-outside-toplevel
  writer = tensorboard.ScalarWriter(os.fspath(tmp_path))
  writer.write_scalars(7, {"accuracy": 0.875, "loss": 1.5})
  raw = [event_pb2.Event.FromString(r) for r in loader.RawEventFileLoader(writer.path).Load()]
  assert raw[0].file_version == "brain.Event:2"
  assert [(e.step, v.tag, v.simple_value) for e in raw for v in e.summary.value] == [
      (7, "accuracy", 0.875), (7, "loss", 1.5)]
  # TensorBoard's own loader turns simple_value into a scalar tensor, as it does for TF's files
  migrated = list(loader.EventFileLoader(writer.path).Load())
  values = [(e.step, v.tag, float(tensor_util.make_ndarray(v.tensor)))
            for e in migrated for v in e.summary.value]
  assert values == [(7, "accuracy", 0.875), (7, "loss", 1.5)]
