"""Hostile or unlucky files are refused from their headers, before any voxel is allocated,
and never hang the reader (``covid3d.data.headers``, ``covid3d.data.read_dicom``)."""
import gzip
import os
import signal
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from covid3d.data import headers, readers
from tests import dicom_fixtures
from tests.data_fixtures import write_slices

MIB = 1 << 20


def nifti_header(shape, dtype=np.int16) -> bytes:
  """The 352 bytes (header and empty extension flag) of a NIfTI-1 file of ``shape``."""
  header = nib.Nifti1Header()
  header.set_data_shape(shape)
  header.set_data_dtype(dtype)
  header.set_zooms((1.0,) * len(shape))
  header["vox_offset"] = 352
  return header.binaryblock + b"\0" * 4


def read_refused(path, **kwargs) -> str:
  """The reason ``read_path`` refuses ``path``, its peak Python allocation under 64 MiB, and
  within 300 s (a hang fails the test instead of stopping the run; a busy machine passes)."""
  signal.alarm(300)
  tracemalloc.start()
  try:
    with pytest.raises(readers.DataError) as e:
      readers.read_path(path, **kwargs)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
    signal.alarm(0)
  assert peak < 64 * MIB, f"{peak / MIB:.0f} MiB allocated for {path}"
  return e.value.reason


def test_a_tiny_nifti_that_claims_gigabytes_is_refused_unread(tmp_path):
  """108 bytes of .nii.gz whose header claims 1536^3 int16 voxels (3.2 GiB)... and within
  the voxel limit, 1024 x 1024 x 1536: the data it holds is counted, never allocated."""
  small = tmp_path / "claims_3gib.nii.gz"
  small.write_bytes(gzip.compress(nifti_header((1024, 1024, 1536))))
  assert small.stat().st_size < 200
  assert "its header describes 3,221,225,824 bytes of image, the file holds 352" in \
      read_refused(small)
  huge = tmp_path / "too_many.nii.gz"
  huge.write_bytes(gzip.compress(nifti_header((2048, 2048, 2048))))
  assert read_refused(huge) == ("2048x2048x2048 is 8,589,934,592 voxels, more than the "
                                "2,097,152,000 allowed (infer --max-voxels)")
  plain = tmp_path / "claims.nii"
  plain.write_bytes(nifti_header((512, 512, 300)))
  assert "the file holds 352" in read_refused(plain)


def test_a_gzip_bomb_is_read_no_further_than_its_header_says(tmp_path):
  """A 64^3 header followed by 256 MiB of zeros (a 0.25 MB .nii.gz): the 64^3 volume is read,
  the rest never decompressed into memory; the empty volume is then no chest CT."""
  bomb = tmp_path / "bomb.nii.gz"
  zeros = bytes(MIB)
  with gzip.open(bomb, "wb", compresslevel=9) as f:
    f.write(nifti_header((64, 64, 64)))
    for _ in range(256):
      f.write(zeros)
  assert bomb.stat().st_size < 2 * MIB
  signal.alarm(300)
  tracemalloc.start()
  try:
    scan = readers.read_path(bomb)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
    signal.alarm(0)
  assert scan.volume.shape == (64, 64, 64) and peak < 64 * MIB
  data = headers.bounded_nifti_bytes(bomb.read_bytes(), headers.MAX_VOXELS)
  assert len(data) == 352 + 2 * 64 ** 3   # from memory (a bucket's object): the same bound


def test_a_metaimage_whose_data_file_is_a_pipe_is_refused_without_hanging(tmp_path):
  os.mkfifo(tmp_path / "data.raw")
  mhd = tmp_path / "scan.mhd"
  mhd.write_text("ObjectType = Image\nNDims = 3\nDimSize = 64 64 40\nElementType = MET_SHORT\n"
                 "ElementSpacing = 5 5 5\nElementDataFile = data.raw\n")
  assert read_refused(mhd) == ("its data file data.raw is not a regular file (a pipe, a device "
                               "or a folder): not read")
  (tmp_path / "list.mhd").write_text(mhd.read_text().replace("data.raw", "LIST\nok.raw data.raw"))
  (tmp_path / "ok.raw").write_bytes(b"\0" * 64 * 64 * 2)
  assert "data.raw is not a regular file" in read_refused(tmp_path / "list.mhd")
  nhdr = tmp_path / "scan.nhdr"
  nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 40\nencoding: raw\n"
                  "data file: data.raw\n\n")
  assert "data.raw is not a regular file" in read_refused(nhdr)


def test_a_metaimage_that_claims_too_many_voxels_is_refused_from_its_header(tmp_path):
  mha = tmp_path / "huge.mha"
  mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\n"
                  b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + b"\0" * 100)
  assert read_refused(mha) == ("4096x4096x4096 is 68,719,476,736 voxels, more than the "
                               "2,097,152,000 allowed (infer --max-voxels)")


def test_a_slice_folder_is_sized_from_the_image_headers(tmp_path):
  write_slices(tmp_path / "scan", np.zeros((30, 64, 64), np.uint8))
  assert read_refused(tmp_path / "scan", max_voxels=100_000) == (
      "30 slices of 64x64 is 122,880 voxels, more than the 100,000 allowed (infer --max-voxels)")


def test_a_dicom_series_without_positions_or_of_mixed_orientations_is_refused(tmp_path):
  """Real DICOM files (copies of pydicom's CT_small.dcm): no positions, two orientations,
  two slices at one position, too many voxels; a pipe in the folder is never opened."""
  dicom_fixtures.write_series(tmp_path / "no_position", 30, drop=("ImagePositionPatient",))
  assert read_refused(tmp_path / "no_position") == (
      "30 of 30 slices have no position (ImagePositionPatient): their spacing is unknown")
  mixed = tmp_path / "mixed"
  dicom_fixtures.write_series(mixed, 30)
  for k, path in enumerate(sorted(mixed.iterdir())[:10]):
    sagittal = dicom_fixtures.source()
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    sagittal.SeriesInstanceUID = dicom_fixtures.SERIES_UID
    sagittal.SOPInstanceUID = f"{dicom_fixtures.SERIES_UID}.9{k}"
    sagittal.save_as(path)
  assert read_refused(mixed) == ("slices in 2 orientations (ImageOrientationPatient): "
                                 "not one volume")
  dicom_fixtures.write_series(tmp_path / "twice", 30, positions=[0.0] * 2 + [5.0 * k for k in
                                                                           range(1, 29)])
  assert read_refused(tmp_path / "twice").startswith("two slices at one position")
  os.mkfifo(tmp_path / "twice" / "pipe.dcm")
  assert read_refused(tmp_path / "twice").startswith("two slices at one position")
  assert read_refused(tmp_path / "mixed", max_voxels=1000) == (
      "30 slices of 128x128 is 491,520 voxels, more than the 1,000 allowed "
      "(infer --max-voxels)")


def test_dicom_of_another_modality_names_it_when_its_geometry_fails(tmp_path):
  """pydicom's RT dose file (15 frames, no per-frame positions) is refused as what it is."""
  import pydicom.data
  reason = read_refused(pydicom.data.get_testdata_file("rtdose.dcm"))
  assert reason.startswith("RTDOSE series: 14 of 15 slices have no position")

