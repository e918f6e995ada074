"""Metric logging: JSON lines, TensorBoard event files (no TensorFlow), progress bar.

Only process 0 writes; the others get a disabled logger. TensorBoard files are
TFRecord files of ``Event`` protocol buffers, encoded here by hand: each record
is ``uint64 length, uint32 masked crc32c(length), data, uint32 masked
crc32c(data)`` (little endian), and the first event names the file version.
"""
import json
import os
import re
import socket
import struct
import time
from concurrent import futures

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
  """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>.<pid>``.

  With ``parts`` (a bucket, whose objects cannot be appended to) the records
  are held in memory instead and `flush` uploads those not yet uploaded as a
  whole event file of their own, ``<that name>.<N>`` (N = 000001, ...; each
  starts with the file-version event). TensorBoard reads every event file of
  a folder, in the order of their names.
  """

  def __init__(self, logdir: str, parts: bool = False):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._header = tfrecord(encode_event(now, 0, file_version="brain.Event:2"))
    self._pending, self._next_part = bytearray(), 1
    self._file = None
    if not parts:
      self._file = self.path.open("wb")
      self._file.write(self._header)
      self._file.flush()

  def scalars(self, step: int, scalars: dict):
    record = tfrecord(encode_event(time.time(), step, scalars))
    if self._file is None:
      self._pending += record
    else:
      self._file.write(record)
      self._file.flush()

  def flush(self):
    """Uploads the pending records as the next event file (``parts`` only)."""
    if self._file is None and self._pending:
      storage.write_bytes(self.path.with_name(f"{self.path.name}.{self._next_part:06d}"),
                          self._header + bytes(self._pending))
      self._pending, self._next_part = bytearray(), self._next_part + 1

  def close(self):
    if self._file is None:
      self.flush()
    else:
      self._file.close()


def _scalars(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


METRICS_FILE = "metrics.jsonl"
# On a bucket the rows go to numbered whole objects in this folder instead.
METRICS_PARTS = METRICS_FILE + ".d"
FLUSH_EVERY_S = 300.0
_PART = re.compile(r"part-(\d+)\.jsonl")


def part_name(number: int) -> str:
  """The name of part ``number`` (1, 2, ...) in ``METRICS_PARTS``: ``part-000001.jsonl``."""
  return f"part-{number:06d}.jsonl"


def metric_parts(workdir) -> list[epath.Path]:
  """The parts in ``<workdir>/metrics.jsonl.d/``, in the order written (by number)."""
  folder = epath.Path(workdir) / METRICS_PARTS
  numbered = [(int(m.group(1)), folder / name) for name in storage.list_names(folder)
              if (m := _PART.fullmatch(name))]
  return [path for _, path in sorted(numbered)]


def _parse_rows(text: str) -> list[dict]:
  rows = []
  for line in text.splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def read_metrics(workdir) -> list[dict]:
  """The logged rows of ``workdir`` in the order written ([] if there are none).

  One reader for both layouts: the rows of ``metrics.jsonl`` (local workdirs,
  and runs on a bucket from before the parts), then those of each part in
  ``metrics.jsonl.d/`` by number. A resumed run continues after its earlier
  rows, so a step may appear twice (the later row is the resumed run's). A
  torn line (a local run killed while writing it) is dropped; a part is one
  whole object, never torn.
  """
  workdir = epath.Path(workdir)
  single = workdir / METRICS_FILE
  texts = [single.read_text()] if single.exists() else []
  parts = metric_parts(workdir)
  if parts:
    # One request per part: read them side by side, keeping their order.
    with futures.ThreadPoolExecutor(min(16, len(parts))) as pool:
      texts += pool.map(lambda path: path.read_text(), parts)
  return [row for text in texts for row in _parse_rows(text)]


def _append_to(path: epath.Path):
  """``path`` (local) opened for appending text, after ending a torn last line.

  A run killed while writing a row leaves it without its newline; the next
  row would otherwise join it and be dropped with it by ``read_metrics``.
  """
  torn = False
  if path.exists():
    with path.open("rb") as f:
      if f.seek(0, os.SEEK_END):
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
  f = path.open("a")
  if torn:
    f.write("\n")
  return f


class MetricLogger:
  """JSON lines (see ``read_metrics``, continued on resume) and TensorBoard
  scalars (``tensorboard/``, one event file per run, or per flush on a bucket).

  Locally the rows are appended to ``metrics.jsonl`` and flushed at every
  write. An object in a bucket cannot be appended to, so on gs:// (or in a
  workdir that already has parts) the rows are held in memory and `flush`
  uploads those not yet uploaded as the next part, ``metrics.jsonl.d/part-N.jsonl``:
  each row is uploaded once, and each part is created whole or not at all.
  The training loop flushes before every checkpoint, so a checkpoint's rows
  are on the bucket before it is; `write` also flushes once ``flush_every_s``
  has passed since the last flush, and `close` flushes the rest.

  Args:
    workdir: str, local or gs:// directory.
    enabled: False on processes other than 0 (all calls do nothing).
    flush_every_s: float, seconds after which a write also flushes (bucket).
  """

  def __init__(self, workdir: str, enabled: bool = True,
               flush_every_s: float = FLUSH_EVERY_S):
    self.enabled = enabled
    if not enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._parts = workdir / METRICS_PARTS
    self._flush_every_s = flush_every_s
    self._flushed_at = time.monotonic()
    self._pending: list[str] = []
    if storage.is_remote(workdir) or self._parts.exists():
      written = metric_parts(workdir)
      self._next_part = int(_PART.fullmatch(written[-1].name).group(1)) + 1 if written else 1
      self._jsonl = None
    else:
      self._jsonl = _append_to(workdir / METRICS_FILE)
    self._events = EventWriter(str(workdir / "tensorboard"), parts=self._jsonl is None)

  def write(self, step: int, split: str, metrics: dict):
    """Records the scalar entries of ``metrics`` as ``<split>/<name>`` at ``step``."""
    if not self.enabled:
      return
    scalars = _scalars(metrics)
    line = json.dumps({"step": int(step), "split": split, **scalars}) + "\n"
    self._events.scalars(int(step), {f"{split}/{k}": v for k, v in scalars.items()})
    if self._jsonl is None:
      self._pending.append(line)
      if time.monotonic() - self._flushed_at >= self._flush_every_s:
        self.flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()

  def flush(self):
    """Uploads the rows (and TensorBoard records) written since the last flush as the
    next part (bucket only; a local file is flushed at every write).

    If an upload fails its rows stay pending: the next flush uploads them.
    """
    if not self.enabled:
      return
    if self._pending:
      storage.write_text(self._parts / part_name(self._next_part), "".join(self._pending))
      self._next_part += 1
      self._pending = []
    self._events.flush()
    self._flushed_at = time.monotonic()

  def close(self):
    """Flushes, then closes the files."""
    if not self.enabled:
      return
    try:
      self.flush()
    finally:
      if self._jsonl is not None:
        self._jsonl.close()
      self._events.close()


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar over optimiser steps (disabled off process 0)."""
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True)
