"""Hostile or unlucky image files, caught from their headers before any voxel is allocated.

* `check_voxels`: a volume's voxel count (from its header) against a limit, ``MAX_VOXELS``
  unless the caller gives another (``python -m covid3d.infer --max-voxels``).
* `check_nifti`: a NIfTI header's size against the limit, and against the bytes the file
  really holds: a ``.nii.gz`` is decompressed in 1 MiB chunks that are counted and dropped,
  up to the end of the data its header describes, so a 108-byte file that claims gigabytes
  is refused having used 1 MiB, and a gzip bomb is never read past what its header claims.
* `check_data_files`: the data files a MetaImage or NRRD header names (``ElementDataFile``,
  ``data file``) must be regular files: a pipe or a device would block the reader forever.
"""
import gzip
import io
import math
import os
import re
import stat
from pathlib import Path

# 1024 x 1024 pixels x 2000 slices: above any chest CT of the three datasets (512 x 512,
# at most about 1000 slices) and ultra-high-resolution scanners' 1024 matrix; 8 GiB per
# float32 copy.
MAX_VOXELS = 1024 * 1024 * 2000
CHUNK = 1 << 20
HEADER_TEXT_BYTES = 1 << 16   # a MetaImage/NRRD header longer than this is not read further
NIFTI2_HEADER_BYTES = 540  # a NIfTI-2 header's sizeof_hdr (NIfTI-1: 348)
# The header line naming the data file: MetaImage ``ElementDataFile = x``, NRRD ``data file: x``.
DETACHED = re.compile(r"\s*(?:ElementDataFile\s*=|data\s?file\s*:)(.*)", re.IGNORECASE)


class Refused(ValueError):
  """A file refused before its voxels are read; ``str()`` is the reason (one line)."""


def check_voxels(n: int, max_voxels: int, what: str) -> None:
  """Raises `Refused` when ``n`` voxels (``what``: e.g. '300 slices of 512x512') exceed
  ``max_voxels``."""
  if n > max_voxels:
    raise Refused(f"{what} is {n:,} voxels, more than the {max_voxels:,} allowed "
                  "(infer --max-voxels)")


def _extent(header, max_voxels: int) -> int:
  """Bytes from a NIfTI file's start to the end of the data its nibabel ``header`` describes.

  Raises:
    Refused: more than ``max_voxels`` voxels.
  """
  shape = tuple(int(d) for d in header.get_data_shape())
  n = math.prod(shape)
  check_voxels(n, max_voxels, "x".join(map(str, shape)))
  return int(header.get_data_offset()) + n * header.get_data_dtype().itemsize


def _short(need: int, got: int) -> Refused:
  return Refused(f"its header describes {need:,} bytes of image, the file holds {got:,}: "
                 "truncated or forged")


def check_nifti(path, max_voxels: int) -> None:
  """A local NIfTI file's header: its size within ``max_voxels``, and its data wholly in the
  file (decompressed and counted for ``.nii.gz``, never kept).

  Raises:
    Refused: the reason.
  """
  gz = str(path).lower().endswith(".gz")
  with (gzip.open if gz else open)(path, "rb") as f:
    head = f.read(NIFTI2_HEADER_BYTES)
    need = _extent(_nifti_header(head), max_voxels)
    if not gz:
      got = os.path.getsize(path)
    else:
      got = len(head)
      while got < need and (chunk := f.read(min(CHUNK, need - got))):
        got += len(chunk)
  if got < need:
    raise _short(need, got)


def bounded_nifti_bytes(data: bytes, max_voxels: int) -> bytes:
  """The NIfTI bytes of a (possibly gzipped) file's ``data`` held in memory (a bucket's
  object), decompressed no further than the data its header describes.

  Raises:
    Refused: too many voxels, or less data than the header describes.
  """
  if data[:2] != b"\x1f\x8b":    # gzip's magic number
    need = _extent(_nifti_header(data[:NIFTI2_HEADER_BYTES]), max_voxels)
    if len(data) < need:
      raise _short(need, len(data))
    return data
  with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
    head = f.read(NIFTI2_HEADER_BYTES)
    need = _extent(_nifti_header(head), max_voxels)
    whole = head + f.read(max(0, need - len(head)))
  if len(whole) < need:
    raise _short(need, len(whole))
  return whole


def is_nifti2(head: bytes) -> bool:
  """Whether the NIfTI bytes ``head`` start with a NIfTI-2 header (its ``sizeof_hdr``)."""
  return NIFTI2_HEADER_BYTES in (int.from_bytes(head[:4], "little"),
                                 int.from_bytes(head[:4], "big"))


def _nifti_header(head: bytes):
  """The nibabel header (NIfTI-1 or -2) at the start of ``head``."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  return (nib.Nifti2Header if is_nifti2(head) else nib.Nifti1Header).from_fileobj(
      io.BytesIO(head))


def detached_files(path) -> list[Path]:
  """The data files a MetaImage (``ElementDataFile``) or NRRD (``data file``) header at
  ``path`` names, relative to its folder; [] when the data is in the file itself."""
  with open(path, "rb") as f:
    lines = f.read(HEADER_TEXT_BYTES).decode("latin-1").splitlines()
  nrrd = not str(path).lower().endswith((".mha", ".mhd"))
  for i, line in enumerate(lines):
    if nrrd and not line.strip():
      break     # an NRRD header ends at its first blank line
    found = DETACHED.match(line)
    if not found:
      continue
    value = found.group(1).strip()
    if value.upper() == "LOCAL":
      return []
    if value.upper().startswith("LIST"):
      names = [n for rest in lines[i + 1:] for n in rest.split()]
    elif "%" in value and len(value.split()) >= 3:   # a pattern: format min max [step]
      fmt, *numbers = value.split()
      lo, hi, step = (int(v) for v in (*numbers, 1)[:3])
      names = [fmt % k for k in range(lo, hi + 1, step or 1)]
    else:
      names = [value]
    return [Path(n) if Path(n).is_absolute() else Path(path).parent / n for n in names]
  return []


def check_data_files(path) -> None:
  """Every data file a MetaImage/NRRD header names is a regular file.

  Raises:
    Refused: one is missing, or is a pipe, a device or a folder (never opened).
  """
  for p in detached_files(path):
    try:
      mode = os.stat(p).st_mode
    except OSError as e:
      raise Refused(f"its data file {p.name} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
      raise Refused(f"its data file {p.name} is not a regular file (a pipe, a device or a "
                    "folder): not read")
