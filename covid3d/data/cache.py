"""The preprocessing cache: content keys, record files, the index.

A record (one scan) is a small JSON file, `<dataset>-<partition>-<scan id>-<key
prefix>.record.json` (its scan id, labels, `has_mask` and the names of its
arrays), and one `.npy` file per array beside it, `<that stem>.<field>.npy`
(`volume_<s>`, and `mask_<s>` only when the scan has a lesion mask; an absent
mask reads as zeros). A reader opens only the fields it uses, memory-mapped
(`read_array`): no decompression, no copy until the batch is stacked. Each
file is written atomically (`storage.whole_file`), the JSON file last, so a
record whose JSON file exists is complete and an interrupted build leaves no
half record. The key is a BLAKE2b hash of the preprocessing settings, the scan
id, its labels and the bytes of every input file (slices, volume, mask): a
rerun finds finished scans, and changed data, labels or settings give new
files. Old files are never deleted (delete the folder to reclaim space).

`index.csv` lists dataset, partition, scan_id, labels, has_mask and file (the
record's JSON file) of every cached scan, so labels are known without opening volumes. Each build
merges its scans into it (last build wins per scan); a build shared by several
processes has process 0 merge them all (`preprocess.build_cache`). Do not run
two builds into one folder at the same time. The folder may be ``gs://``.
"""
import csv
import errno
import hashlib
import io
import json
import os
import threading
import zipfile
import re

import numpy as np

from covid3d import storage

INDEX_FILE = "index.csv"
RECORD_SUFFIX = ".record.json"
INDEX_FIELDS = ("dataset", "partition", "scan_id", "covid", "severity", "stoic_covid",
                "stoic_severe", "has_mask", "file")
INT_INDEX_FIELDS = ("covid", "severity", "stoic_covid", "stoic_severe", "has_mask")
_CHUNK = 1 << 20


def cache_key(ref, settings: dict) -> str:
  """Hex BLAKE2b key of a ScanRef's inputs and the preprocessing `settings`.

  Raises:
    OSError: if an input file cannot be read.
  """
  h = hashlib.blake2b(digest_size=20)
  files = [*ref.paths, *([ref.mask_path] if ref.mask_path else [])]
  head = {"settings": settings, "dataset": ref.dataset, "scan_id": ref.scan_id,
          "labels": ref.labels, "files": [os.path.basename(p) for p in files],
          "mask": bool(ref.mask_path)}
  h.update(json.dumps(head, sort_keys=True).encode())
  remote = [p for p in files if storage.is_remote(p)]  # a bucket's objects: fetched at once
  fetched = dict(zip(remote, storage.read_many(remote), strict=True))
  for p in files:
    if p in fetched:  # hashed as a local file of the same bytes is
      data = fetched[p]
      if isinstance(data, BaseException):
        raise OSError(errno.EIO, f"{type(data).__name__}: {data}", p) from data
      h.update(len(data).to_bytes(8, "little"))
      h.update(data)
      continue
    with open(p, "rb") as f:
      h.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
      while chunk := f.read(_CHUNK):
        h.update(chunk)
  return h.hexdigest()


def record_file(ref, key: str) -> str:
  """File name of a ScanRef's record under `key`."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ref.scan_id)
  return f"{ref.dataset}-{ref.partition}-{safe}-{key[:16]}{RECORD_SUFFIX}"


def array_file(record_path, field: str) -> str:
  """The `.npy` file of a record's array `field`, beside the record's JSON file."""
  return f"{str(record_path).removesuffix(RECORD_SUFFIX)}.{field}.npy"


def write_record(path, record: dict) -> None:
  """Writes `record` at `path` (a `record_file` name): each array, then the JSON file.

  Args:
    path: the record's JSON file, local or a bucket URL.
    record: 'scan_id', ints (numpy or Python) and (s, s, s) arrays; the arrays
      are the keys listed in the JSON file's 'arrays'.
  """
  arrays = sorted(k for k, v in record.items() if isinstance(v, np.ndarray) and v.ndim)
  for k in arrays:
    with storage.whole_file(array_file(path, k)) as f:
      np.lib.format.write_array(f, np.ascontiguousarray(record[k]), allow_pickle=False)
  meta = {k: v.item() if isinstance(v, np.generic) else v
          for k, v in record.items() if k not in arrays}
  storage.write_json(path, {**meta, "arrays": arrays}, sort_keys=True)


def read_meta(path) -> dict:
  """The JSON file of a record: its scan id, ints and 'arrays' (the stored array fields)."""
  if storage.is_remote(path):
    return storage.read_json(path)
  with open(path, "rb") as f:
    return json.loads(f.read())


# numpy parses each .npy header with ast.literal_eval, and CPython 3.11's ast
# constructor is not safe to run in several threads at once (python/cpython
# gh-106905: "SystemError: AST constructor recursion depth mismatch"), which the
# input pipeline's reader threads do. Headers are parsed under this lock; the
# array bytes are read (or mapped) and decompressed outside it.
_HEADER_LOCK = threading.Lock()


def _header(f):
  """(shape, fortran_order, dtype) of the .npy file at ``f``'s position; ``f`` after it."""
  version = np.lib.format.read_magic(f)
  with _HEADER_LOCK:
    return (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else
            np.lib.format.read_array_header_2_0(f))


def read_array(path) -> np.ndarray:
  """One `.npy` file: memory-mapped (read-only) when local, from its bytes on a bucket.

  A local array costs no read until its values are used (the page cache, or
  the disk, serves them then) and no copy; safe in several threads at once
  (see ``_HEADER_LOCK``).
  """
  if storage.is_remote(path):
    data = storage.as_path(path).read_bytes()
    f = io.BytesIO(data)
    shape, fortran_order, dtype = _header(f)
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=f.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")
  with open(path, "rb") as f:
    shape, fortran_order, dtype = _header(f)
    offset = f.tell()
  return np.memmap(path, dtype, "r", offset, shape, "F" if fortran_order else "C")


def read_npz(source) -> dict:
  """All arrays of an .npz file (a path or an open binary file), read-only, in memory.

  For the pseudolabel stage's (compressed) mask files. Safe to call from
  several threads at once (see ``_HEADER_LOCK``).
  """
  out = {}
  with zipfile.ZipFile(source) as archive:
    for member in archive.namelist():
      with archive.open(member) as f:
        shape, fortran_order, dtype = _header(f)
        data = np.frombuffer(f.read(), dtype=dtype)
      out[member.removesuffix(".npy")] = data.reshape(shape, order="F" if fortran_order else "C")
  return out


def read_index(cache_dir) -> list[dict]:
  """Rows of `<cache_dir>/index.csv` (ints as int; [] if there is none)."""
  path = storage.as_path(cache_dir) / INDEX_FILE
  if not path.is_file():
    return []
  rows = list(csv.DictReader(storage.text_lines(path)))
  for row in rows:
    for k in INT_INDEX_FIELDS:
      row[k] = int(row[k])
  return rows


def update_index(cache_dir, rows: list[dict]) -> str:
  """Merges `rows` into the index (same dataset/partition/scan_id replaced)."""
  key = lambda r: (r["dataset"], r["partition"], r["scan_id"])
  merged = {key(r): r for r in read_index(cache_dir)}
  merged.update((key(r), r) for r in rows)
  path = storage.as_path(cache_dir) / INDEX_FILE
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, INDEX_FIELDS)
  writer.writeheader()
  writer.writerows(merged[k] for k in sorted(merged))
  storage.write_text(path, text.getvalue())
  return str(path)
