"""`Scan` (one CT volume with labels and geometry), `ScanRef` and geometry.

Axis convention. Every reader returns `Scan.volume` as (D, H, W) = (z, y, x)
of an LPS voxel grid: the array's x axis (W, columns) runs towards the
patient's Left, y (H, rows) towards Posterior, z (D, slices) towards Superior.
This is what SimpleITK's `GetArrayFromImage` gives for an image with the
identity direction, and shows an axial slice `volume[k]` the radiological way
(patient's right on the image's left, anterior at the top). NIfTI and MHA
files in any orientation are flipped/permuted to it with
`nibabel.orientations` (90-degree steps chosen from the affine; no
resampling, so voxel values are unchanged). JPEG slice folders have no
geometry: their slices are taken as they are (rows, columns) with 1 mm
spacing, the identity LPS grid.

Files are read whatever the case of their extension: SimpleITK is told its
ImageIO from the lower-cased extension (`sitk_reader`), since it would pick
none for '.MHA'.

`write_mask_like` (and `write_image_like` for any array) undoes the
flips/permutation and writes a mask in the original file's voxel grid and
affine, as NIfTI (.nii, .nii.gz, nibabel) or any SimpleITK format (.mha,
.nrrd, ...).
"""
import dataclasses
from pathlib import Path

import numpy as np
from nibabel import orientations as nio

# Voxel axes (x, y, z) of the canonical grid point to patient Left, Posterior, Superior.
CANONICAL_AXCODES = ("L", "P", "S")
_LPS_TO_RAS = np.diag([-1., -1., 1., 1.])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# SimpleITK picks its reader by the (case-sensitive) extension: name it for any case.
SITK_IMAGE_IOS = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO",
                  ".nhdr": "NrrdImageIO", ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}


@dataclasses.dataclass(frozen=True)
class ScanRef:
  """Where a scan's files are; listing it opens no image.

  Attributes:
    dataset: 'cov19ctdb', 'lesions' or 'stoic'.
    scan_id: unique within dataset + partition (COV19-CT-DB: '<class>/ct_scan_N'
      in labelled partitions, 'ct_scan_N' in the test partition).
    paths: the image files: the JPEG slices in numeric order, or the one
      NIfTI/MHA volume.
    labels: any of 'covid', 'severity', 'stoic_covid', 'stoic_severe' (ints).
    partition: 'train', 'validation' or 'test'.
    mask_path: a lesion mask in the scan's geometry (NIfTI/MHA), or None.
  """
  dataset: str
  scan_id: str
  paths: tuple[str, ...]
  labels: dict
  partition: str
  mask_path: str | None = None


@dataclasses.dataclass
class Scan:
  """One CT scan read into memory.

  Attributes:
    scan_id: as in its ScanRef.
    volume: float32 (D, H, W) in [0, 1], canonical LPS axes (module doc).
    spacing: (z, y, x) voxel size of `volume` in mm; (1, 1, 1) for JPEG folders.
    origin: (x, y, z) world (LPS, mm) position of voxel (0, 0, 0) of the
      ORIGINAL file, as ITK reports it.
    direction: float64 (3, 3) ITK direction cosines of the ORIGINAL file
      (columns: directions of its voxel axes i, j, k in LPS).
    labels: any of 'covid', 'severity', 'stoic_covid', 'stoic_severe'.
    mask: uint8 (D, H, W) lesion mask on the volume's grid, or None.
    source: the folder or file read.
    meta: 'affine_ras' (4, 4) original NIfTI-style affine, 'ornt' (3, 2) the
      original orientation (nibabel ornt), 'shape_ijk' original array shape;
      JPEG folders add 'slices' (file names kept, in order).
  """
  scan_id: str
  volume: np.ndarray
  spacing: tuple[float, float, float]
  origin: tuple[float, float, float]
  direction: np.ndarray
  labels: dict
  mask: np.ndarray | None = None
  source: str = ""
  meta: dict = dataclasses.field(default_factory=dict)


def itk_to_ras_affine(spacing_xyz, origin_xyz, direction) -> np.ndarray:
  """(4, 4) RAS affine (NIfTI convention) of an ITK geometry (LPS)."""
  lps = np.eye(4)
  lps[:3, :3] = np.asarray(direction, np.float64).reshape(3, 3) @ np.diag(spacing_xyz)
  lps[:3, 3] = origin_xyz
  return _LPS_TO_RAS @ lps


def ras_affine_to_itk(affine):
  """(spacing_xyz, origin_xyz, direction (3, 3)) ITK geometry of a RAS affine."""
  lps = _LPS_TO_RAS @ np.asarray(affine, np.float64)
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  return tuple(spacing), tuple(lps[:3, 3]), lps[:3, :3] / spacing


def to_canonical(data_ijk: np.ndarray, affine_ras: np.ndarray):
  """Flips/permutes an (i, j, k) array to the canonical (z, y, x) LPS layout.

  Args:
    data_ijk: (I, J, K) array in the file's voxel order (nibabel's order).
    affine_ras: (4, 4) voxel -> RAS mm affine of that array.

  Returns:
    (array (D, H, W), spacing (z, y, x) mm, meta dict for `from_canonical`).
  """
  affine_ras = np.asarray(affine_ras, np.float64)
  ornt = nio.io_orientation(affine_ras)
  to_lps = nio.ornt_transform(ornt, nio.axcodes2ornt(CANONICAL_AXCODES))
  data = nio.apply_orientation(data_ijk, to_lps)
  zooms = np.linalg.norm(affine_ras[:3, :3], axis=0)
  # New axis n is the old axis i with to_lps[i, 0] == n.
  spacing_xyz = zooms[to_lps[:, 0].argsort()]
  meta = {"affine_ras": affine_ras, "ornt": ornt, "shape_ijk": tuple(data_ijk.shape)}
  return (np.ascontiguousarray(data.transpose(2, 1, 0)),
          tuple(float(s) for s in spacing_xyz[::-1]), meta)


def from_canonical(array_zyx: np.ndarray, meta: dict) -> np.ndarray:
  """Inverse of `to_canonical`: a (D, H, W) array back to the file's (I, J, K)."""
  back = nio.ornt_transform(nio.axcodes2ornt(CANONICAL_AXCODES), meta["ornt"])
  return nio.apply_orientation(np.asarray(array_zyx).transpose(2, 1, 0), back)


def identity_meta(shape_zyx) -> dict:
  """`Scan.meta` geometry of a volume without one (identity LPS, 1 mm)."""
  return {"affine_ras": _LPS_TO_RAS.copy(),
          "ornt": nio.axcodes2ornt(CANONICAL_AXCODES),
          "shape_ijk": tuple(shape_zyx[::-1])}


def is_nifti(path) -> bool:
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def sitk_reader(path):
  """A SimpleITK ImageFileReader of `path`, its ImageIO set from the extension
  in any case ('.MHA' reads as MetaImage; unknown extensions: SimpleITK's guess)."""
  import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  low = str(path).lower()
  for suffix, io in SITK_IMAGE_IOS.items():
    if low.endswith(suffix):
      reader.SetImageIO(io)
      break
  return reader


def write_mask_like(mask: np.ndarray, scan: Scan, path) -> str:
  """Writes a (D, H, W) integer mask (stored as uint8) like `write_image_like`."""
  return write_image_like(np.asarray(mask).astype(np.uint8), scan, path)


def write_image_like(image: np.ndarray, scan: Scan, path) -> str:
  """Writes a (D, H, W) array on `scan.volume`'s grid in the scan's original geometry.

  The array is flipped/permuted back to the original file's voxel order and
  written with its affine (NIfTI: qform and sform, code 1 'scanner') or its
  origin/spacing/direction (other SimpleITK formats, compressed), in its dtype.

  Args:
    image: (D, H, W), same shape as `scan.volume` (a mask, a probability or saliency map).
    scan: the scan it belongs to.
    path: output file; '.nii'/'.nii.gz' via nibabel, else SimpleITK ('.mha', ...).

  Returns:
    str(path).

  Raises:
    ValueError: if the array's shape differs from the volume's.
  """
  image = np.asarray(image)
  if image.shape != scan.volume.shape:
    raise ValueError(f"image for {path}: shape {image.shape} differs from scan "
                     f"{scan.scan_id!r} volume shape {scan.volume.shape}")
  data = from_canonical(image, scan.meta)
  affine = scan.meta["affine_ras"]
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  if is_nifti(path):
    import nibabel as nib  # pylint: disable=g-import-not-at-top
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
  else:
    import SimpleITK as sitk  # pylint: disable=g-import-not-at-top
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    spacing, origin, direction = ras_affine_to_itk(affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(path), useCompression=True)
  return str(path)
