"""Can a scan be a chest CT? The checks ``covid3d.infer`` runs on every scan before predicting.

`problems(scan)` lists, in words a clinician reads, why a scan (`covid3d.data.scan.Scan`, as
`readers.read_path` gives it) is not one; [] when it passes. The thresholds (`Rules`) and
where they come from are in docs/inference.md ("Which scans are accepted"):

* **Modality**: a DICOM series must be CT (an MR, PET or RT dose series is refused).
* **Size**: at least ``min_slices`` slices and ``min_pixels`` rows and columns; where the
  geometry is known (DICOM, NIfTI, MetaImage, NRRD; not slice folders, which have none), a
  craniocaudal extent of at least ``min_extent_mm`` and an in-plane field of view of at least
  ``min_fov_mm``. Slice spacing is made uniform by the DICOM reader (resampled by position,
  `covid3d.data.read_dicom`), never stretched.
* **An image, not noise**: neighbouring voxels of a CT are strongly correlated, those of
  noise are not (``min_correlation``).
* **Anatomy**: on a block-averaged copy of at most ``cells`` voxels per axis, each axial
  slice is split into dark (air, lung) and bright (tissue, bone) at -500 HU (HU volumes) or
  at the scan's Otsu threshold (8-bit slice folders, whose window is not known). The dark
  regions that touch the slice's edge are the air outside the body; the enclosed ones are
  lung-density (or other gas) voxels inside it. A chest CT has air outside
  (``min_outside``), a body (``min_body``), and lungs inside it (``min_lungs``); in a HU volume
  the air outside also reads about -1000 HU (``max_air_hu``), which it does not in a volume
  of other units (MR, an unscaled export).
"""
import dataclasses

import numpy as np
from scipy import ndimage

from covid3d.data.read_common import HU_WINDOW


@dataclasses.dataclass(frozen=True)
class Rules:
  """Acceptance thresholds (docs/inference.md gives each one's source)."""
  min_slices: int = 20          # 10 mm slices over 200 mm of chest
  min_pixels: int = 32          # rows and columns
  min_extent_mm: float = 150.0  # craniocaudal: apex to base of the shortest adult lungs
  min_fov_mm: float = 150.0     # in-plane field of view, each axis
  min_correlation: float = 0.3  # neighbouring voxels (CT: > 0.8; noise: about 0)
  dark_hu: float = -500.0       # air and lung below, soft tissue and bone above
  max_air_hu: float = -800.0    # the median air outside the body, in a HU volume
  min_outside: float = 0.03     # air outside the body, share of the voxels
  min_body: float = 0.10        # body, share of the voxels
  min_lungs: float = 0.005      # enclosed dark voxels, share of the body
  cells: int = 64               # the block-averaged copy's largest axis


def unit(hu: float) -> float:
  """A HU value on the model's [0, 1] input scale (`read_common.hu_to_unit`)."""
  lo, hi = HU_WINDOW
  return float(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))


def has_geometry(scan) -> bool:
  """Whether the scan's spacing is real (a volume file or DICOM), not a slice folder's 1 mm."""
  return "slices" not in scan.meta


def block_mean(volume: np.ndarray, cells: int) -> np.ndarray:
  """(d, h, w) block means of ``volume`` (D, H, W), each axis cut to at most ``cells``."""
  factors = [max(1, -(-n // cells)) for n in volume.shape]
  cut = volume[tuple(slice(0, n - n % f) for n, f in zip(volume.shape, factors, strict=True))]
  shape = [x for n, f in zip(cut.shape, factors, strict=True) for x in (n // f, f)]
  return cut.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float64)


def otsu(values: np.ndarray) -> float:
  """The threshold between two classes of ``values`` that maximises their between-class
  variance (Otsu, 1979), on a 256-bin histogram."""
  hist, edges = np.histogram(values, bins=256)
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist)
  m0 = np.cumsum(hist * centres)
  total, mean = w0[-1], m0[-1]
  w1 = total - w0
  with np.errstate(divide="ignore", invalid="ignore"):
    between = (mean * w0 - total * m0) ** 2 / (w0 * w1)
  return float(centres[int(np.nanargmax(between[:-1]))])


def neighbour_correlation(small: np.ndarray) -> float:
  """Pearson correlation of in-plane neighbouring voxels (along rows and columns); 0 for a
  constant volume."""
  pairs = [(small[:, :, :-1], small[:, :, 1:]), (small[:, :-1, :], small[:, 1:, :])]
  a = np.concatenate([p[0].ravel() for p in pairs])
  b = np.concatenate([p[1].ravel() for p in pairs])
  if a.std() == 0 or b.std() == 0:
    return 0.0
  return float(np.corrcoef(a, b)[0, 1])


def regions(small: np.ndarray, threshold: float):
  """(outside, body, inside) boolean masks of ``small`` (d, h, w): dark regions touching
  their axial slice's edge, the bright voxels, and the dark regions each slice encloses."""
  dark = small < threshold
  in_slice = np.zeros((3, 3, 3), bool)
  in_slice[1] = ndimage.generate_binary_structure(2, 1)
  labels, _ = ndimage.label(dark, structure=in_slice)
  edge = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                   labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
  outside = np.isin(labels, edge[edge > 0])
  return outside, ~dark, dark & ~outside


def problems(scan, rules: Rules = Rules()) -> list[str]:
  """Why ``scan`` cannot be a chest CT, one phrase each (module doc); [] when it can be."""
  out = []
  modality = scan.meta.get("modality")
  if modality and modality != "CT":
    out.append(f"{modality} series: covid3d reads CT only")
  d, h, w = scan.volume.shape
  sz, sy, sx = scan.spacing
  if d < rules.min_slices:
    covering = f" covering {d * sz:.0f} mm" if has_geometry(scan) else ""
    out.append(f"{d} slices{covering}; a chest CT has at least {rules.min_slices} slices")
  elif has_geometry(scan) and d * sz < rules.min_extent_mm:
    out.append(f"{d} slices covering {d * sz:.0f} mm; a chest CT covers at least "
               f"{rules.min_extent_mm:.0f} mm")
  if min(h, w) < rules.min_pixels:
    out.append(f"slices of {w}x{h} pixels; a chest CT has at least {rules.min_pixels}x"
               f"{rules.min_pixels}")
  elif has_geometry(scan) and min(h * sy, w * sx) < rules.min_fov_mm:
    out.append(f"a field of view of {w * sx:.0f}x{h * sy:.0f} mm; a chest CT's is at least "
               f"{rules.min_fov_mm:.0f} mm across")
  if out:
    return out
  return intensity_problems(scan, rules)


def intensity_problems(scan, rules: Rules = Rules()) -> list[str]:
  """The image and anatomy checks of `problems` (module doc)."""
  small = block_mean(scan.volume, rules.cells)
  r = neighbour_correlation(small)
  if r < rules.min_correlation:
    return [f"looks like noise, not an image: neighbouring voxels are uncorrelated "
            f"(r = {r:.2f}; a CT's are above {rules.min_correlation})"]
  hu = has_geometry(scan)
  outside, body, inside = regions(small, unit(rules.dark_hu) if hu else otsu(small))
  out = []
  if outside.mean() < rules.min_outside:
    out.append("no air around the body at the edges of the slices")
  elif hu and np.median(small[outside]) > unit(rules.max_air_hu):
    lo, hi = HU_WINDOW
    air = np.median(small[outside]) * (hi - lo) + lo
    out.append(f"the air around the body reads {air:.0f} HU, not about -1000: not a CT in "
               "Hounsfield units")
  if body.mean() < rules.min_body:
    out.append(f"too little body: {100 * body.mean():.1f} % of the voxels are tissue")
  elif inside.sum() < rules.min_lungs * (body.sum() + inside.sum()):
    out.append("no lungs: no air-filled tissue inside the body")
  return out
