"""Metric logging: JSON lines, TensorBoard event files (no TensorFlow), progress bar.

Only process 0 writes; the others get a disabled logger. TensorBoard files are
TFRecord files of ``Event`` protocol buffers, encoded here by hand: each record
is ``uint64 length, uint32 masked crc32c(length), data, uint32 masked
crc32c(data)`` (little endian), and the first event names the file version.
"""
import json
import os
import socket
import struct
import time

import numpy as np
import tqdm
from etils import epath

from covid3d import storage


def _crc32c_table() -> np.ndarray:
  table = np.zeros(256, np.uint32)
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table[i] = crc
  return table


_CRC_TABLE = _crc32c_table().tolist()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses it; crc32c(b'123456789') = 0xE3069283."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits, value = value & 0x7F, value >> 7
    out.append(bits | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  key = _varint(number << 3 | wire_type)
  if wire_type == 2:  # length-delimited
    return key + _varint(len(payload)) + payload
  return key + payload


def encode_event(wall_time: float, step: int, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
  """Serialises a ``tensorflow.Event``.

  Fields used: wall_time (1, double), step (2, int64), file_version (3,
  string), summary (5, ``Summary`` with repeated ``value`` (1): tag (1,
  string), simple_value (2, float)).
  """
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    out += _field(5, 2, values)
  return out


class EventWriter:
  """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>``."""

  def __init__(self, logdir: str):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._file = self.path.open("wb")
    self._file.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, scalars: dict):
    self._file.write(tfrecord(encode_event(time.time(), step, scalars)))
    self._file.flush()

  def close(self):
    self._file.close()


def _scalars(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` in the order written ([] if there is none).

  A resumed run appends after its earlier rows, so a step may appear twice
  (the later row is the resumed run's). A torn last line (a local run killed
  while writing it) is dropped.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


class MetricLogger:
  """JSON lines (``metrics.jsonl``, continued on resume; see ``read_metrics``) and
  TensorBoard scalars (``tensorboard/``, one event file per run).

  A local file is appended to. An object in a bucket cannot be appended to, so
  on gs:// the whole file (earlier rows included) is uploaded again at every
  write; each upload replaces the object whole.

  Args:
    workdir: str, local or gs:// directory.
    enabled: False on processes other than 0 (all calls do nothing).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / METRICS_FILE
    if storage.is_remote(workdir):
      self._lines = [json.dumps(row) + "\n" for row in read_metrics(workdir)]
      self._jsonl = None
    else:
      self._jsonl = self._path.open("a")
    self._events = EventWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict):
    """Records the scalar entries of ``metrics`` as ``<split>/<name>`` at ``step``."""
    if not self.enabled:
      return
    scalars = _scalars(metrics)
    line = json.dumps({"step": int(step), "split": split, **scalars}) + "\n"
    if self._jsonl is None:
      self._lines.append(line)
      storage.write_text(self._path, "".join(self._lines))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    self._events.scalars(int(step), {f"{split}/{k}": v for k, v in scalars.items()})

  def close(self):
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._events.close()


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar over optimiser steps (disabled off process 0)."""
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True)
