"""Synthetic chest-CT phantom with COVID-like lesions, in Hounsfield units.

`make_scan` builds one scan from a seed: body outline, subcutaneous fat, chest-wall
muscle, two lungs with a branching vessel tree, heart, aorta, trachea and bronchi,
spine (vertebral bodies, discs, posterior arch), ribs, sternum, liver below the
right diaphragm dome and an optional patient table. COVID scans get peripheral
ground-glass opacities and, when severe or critical, consolidation; the lesion
fraction of the lung volume sets the severity class (`SEVERITY_THRESHOLDS`).
Non-COVID scans have no lesion, or a few solid nodules (not in the lesion mask).

Array convention (README, "Conventions"): volume float32 (D, H, W) = (slice z, row y, column
x). Index 0 along D is the most inferior slice, rows run anterior -> posterior
and columns patient right -> left, i.e. the arrays are in ITK's LPS orientation
with an identity direction matrix. Writers for the three real dataset formats
are in `covid3d.data.phantom_writers`; `python -m covid3d.data.phantom_writers`
writes them (`--out DIR`) or the example figure (`--png FILE`).
"""

import dataclasses

import numpy as np
from scipy import ndimage
import threadpoolctl

KINDS = ("covid", "non-covid")
SEVERITY_NAMES = ("mild", "moderate", "severe", "critical")
# Lesion volume / lung volume class boundaries: the quartiles of lung
# involvement of the usual CT severity score, mild < 25 % <= moderate < 50 %
# <= severe < 75 % <= critical.
SEVERITY_THRESHOLDS = (0.25, 0.50, 0.75)
# Sampled target fractions stay well inside each class, so classes are learnable.
TARGET_FRACTIONS = ((0.04, 0.16), (0.30, 0.45), (0.55, 0.70), (0.80, 0.92))
# Share of the lesion volume that is consolidation, per severity class.
CONSOLIDATION_SHARE = (0.0, 0.0, 0.2, 0.4)

# Tissue label -> nominal HU. `info['tissue']` holds these labels per voxel.
TISSUES = {
    "air": (0, -1000.0), "fat": (1, -100.0), "soft": (2, 40.0), "lung": (3, -850.0),
    "vessel": (4, 40.0), "bone": (5, 700.0), "marrow": (6, 300.0), "liver": (7, 60.0),
    "ggo": (8, -450.0), "consolidation": (9, -10.0), "nodule": (10, 30.0),
    "table": (11, 150.0),
}
HU_RANGE = (-1024.0, 3071.0)


def _code(name):
  return np.uint8(TISSUES[name][0])


def _hu(name):
  return np.float32(TISSUES[name][1])


def severity_from_fraction(fraction):
  """Severity class 0..3 (mild..critical) of a lesion fraction of the lungs."""
  return int(np.searchsorted(SEVERITY_THRESHOLDS, fraction, side="right"))


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Per-scan anatomy sizes in mm; z up from the volume bottom, y posterior, x left."""
  shape: tuple
  spacing: tuple       # (z, y, x) mm
  body: tuple          # half width, half depth, centre y
  fat: float
  muscle: float
  z_base: float        # lowest lung point (costophrenic angles)
  z_apex: float
  dome: float          # diaphragm dome height
  lung: tuple          # centre x offset, centre y, half width, half depth
  spine: tuple         # centre y, vertebral body radius, disc period, phase
  heart: tuple         # centre (x, y, z), semi-axes (x, y, z)
  rib_period: float
  rib_drop: float
  table_y: float


def _sample_geometry(rng, shape):
  d, h, w = shape
  fov = rng.uniform(340.0, 390.0)
  px = fov / max(h, w)
  height = rng.uniform(270.0, 330.0)
  a_b, b_b = rng.uniform(140.0, 165.0), rng.uniform(100.0, 120.0)
  cy_b = -0.06 * fov + rng.uniform(-5.0, 5.0)
  fat, muscle = rng.uniform(8.0, 22.0), rng.uniform(9.0, 13.0)
  a_in, b_in = a_b - fat - muscle, b_b - fat - muscle
  z_base = rng.uniform(0.14, 0.22) * height
  z_apex = rng.uniform(0.88, 0.96) * height
  r_vb = rng.uniform(14.0, 18.0)
  span = z_apex - z_base
  return _Geometry(
      shape=(d, h, w), spacing=(height / d, px, px), body=(a_b, b_b, cy_b),
      fat=fat, muscle=muscle, z_base=z_base, z_apex=z_apex,
      dome=rng.uniform(0.18, 0.26) * span,
      lung=(0.52 * a_in, cy_b + 0.02 * b_in, 0.47 * a_in, 0.88 * b_in),
      spine=(cy_b + b_in - r_vb - 4.0, r_vb, rng.uniform(25.0, 30.0), rng.uniform(0, 30)),
      heart=((0.18 * a_in, cy_b - 0.3 * b_in, z_base + 0.2 * span),
             (0.40 * a_in, 0.48 * b_in, 0.3 * span)),
      rib_period=rng.uniform(24.0, 28.0), rib_drop=rng.uniform(50.0, 70.0),
      table_y=cy_b + b_b + rng.uniform(3.0, 12.0))


def _grid(geo):
  """Broadcastable mm coordinates z (D,1,1), y (1,H,1), x (1,1,W)."""
  d, h, w = geo.shape
  sz, px, _ = geo.spacing
  z = ((np.arange(d, dtype=np.float32) + 0.5) * sz)[:, None, None]
  y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) * px)[None, :, None]
  x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) * px)[None, None, :]
  return z, y, x


def _segment_distance(points, start, end):
  """Distance (mm) of grid points (tuple z, y, x broadcastable) to a 3-D segment."""
  start, end = np.asarray(start, np.float32), np.asarray(end, np.float32)
  axis = end - start
  rel = [p - s for p, s in zip(points, start, strict=True)]
  t = np.clip(sum(r * a for r, a in zip(rel, axis, strict=True)) / float(axis @ axis), 0.0, 1.0)
  return np.sqrt(sum((r - t * a) ** 2 for r, a in zip(rel, axis, strict=True)))


def _lung_masks(geo, grid):
  """Boolean lungs (D, H, W) and the diaphragm surface height (H, W) in mm."""
  z, y, x = grid
  cx, cy, ax, ay = geo.lung
  u = (z - geo.z_base) / (geo.z_apex - geo.z_base)
  scale = np.sqrt(np.clip(1.0 - np.abs(u) ** 2.2, 0.0, 1.0)) * (u >= 0)
  lungs = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), bool)
  dome = np.full(lungs.shape[1:], np.inf, np.float32)
  for side in (-1.0, 1.0):
    # The left lung (x > 0) is narrower, the heart takes its place.
    width = ax * (0.92 if side > 0 else 1.0)
    rr_base = ((x[0] - side * cx) / width) ** 2 + ((y[0] - cy) / ay) ** 2
    dome = np.minimum(dome, np.where(rr_base < 1, geo.z_base + geo.dome * (1 - rr_base), np.inf))
    rr = ((x - side * cx) / (width * scale + 1e-6)) ** 2 + ((y - cy) / (ay * scale + 1e-6)) ** 2
    lungs |= rr <= 1.0
  lungs &= z > dome[None]
  (hx, hy, hz), (sx, sy, sz) = geo.heart
  heart = ((x - hx) / (sx + 6)) ** 2 + ((y - hy) / (sy + 6)) ** 2 + ((z - hz) / (sz + 6)) ** 2 <= 1
  y_sp, r_vb = geo.spine[:2]
  spine = x ** 2 + (y - y_sp) ** 2 <= (r_vb + 10) ** 2
  aorta = (x - r_vb - 14) ** 2 + (y - y_sp + r_vb * 0.6) ** 2 <= 22 ** 2
  mediastinum = np.abs(x) < 12 + 10 * (z < geo.z_base + 0.7 * (geo.z_apex - geo.z_base))
  return lungs & ~heart & ~spine & ~aorta & ~mediastinum, dome


def _ribs_and_sternum(geo, grid, inner):
  """Bone masks of the ribs (bands in the chest wall) and the sternum."""
  z, y, x = grid
  a_b, b_b, cy_b = geo.body
  a_in, b_in = a_b - geo.fat - geo.muscle, b_b - geo.fat - geo.muscle
  r = np.sqrt(x ** 2 + (y - cy_b) ** 2)
  rho = np.sqrt((x / a_in) ** 2 + ((y - cy_b) / b_in) ** 2)
  depth = r * (1 - 1 / np.maximum(rho, 1e-3))          # mm outside the chest cavity
  phi = np.arctan2(x, y - cy_b)                         # 0 posterior, +-pi anterior
  ring = (depth > 1.5) & (depth < 8.0) & (np.abs(phi) > 0.12 * np.pi) & (np.abs(phi) < 0.8 * np.pi)
  # Ribs run obliquely: the anterior end lies `rib_drop` mm below the posterior one.
  phase = np.mod(z + geo.rib_drop * (1 - np.cos(phi)) / 2, geo.rib_period)
  z_ok = (z > geo.z_base - 25) & (z < geo.z_apex + 5)
  ribs = ring & (phase < 10.0) & z_ok & inner
  sternum = ((x / 14.0) ** 2 + ((y - cy_b + b_in + geo.muscle * 0.5) / 6.0) ** 2 <= 1) & z_ok
  return ribs, sternum & (z > geo.z_base + 20)


def _spine(geo, grid):
  """Cortical bone, marrow and disc masks of the vertebral column."""
  z, y, x = grid
  y_sp, r_vb, period, offset = geo.spine
  disc = np.mod(z + offset, period) < 5.0
  r2 = x ** 2 + (y - y_sp) ** 2
  body = (r2 <= r_vb ** 2) & ~disc
  marrow = (r2 <= (r_vb - 2.5) ** 2) & ~disc
  y_can = y_sp + r_vb + 8
  rc2 = x ** 2 + (y - y_can) ** 2
  arch = (rc2 > 7 ** 2) & (rc2 <= 12 ** 2) & (y > y_can - 3)
  spinous = (np.abs(x) < 3.5) & (y > y_can) & (y < y_can + 32)
  transverse = (np.abs(x) < 28) & (np.abs(y - y_can + 2) < 3.5)
  posterior = (arch | spinous | transverse) & ~disc
  return body | posterior, marrow, disc & (r2 <= r_vb ** 2)


def _anatomy(geo, grid):
  """HU (float32 (D,H,W)), tissue labels (uint8), lung mask and hilum points, no lesions."""
  z, y, x = grid
  shape = geo.shape
  a_b, b_b, cy_b = geo.body
  # Shoulders make the body slightly wider towards the top of the volume.
  widen = 1.0 + 0.06 * np.clip((z - geo.z_apex + 40) / 60, 0, 1)
  rho_body = np.sqrt((x / (a_b * widen)) ** 2 + ((y - cy_b) / b_b) ** 2)
  body = rho_body <= 1.0
  inner = np.sqrt((x / (a_b * widen - geo.fat)) ** 2 + ((y - cy_b) / (b_b - geo.fat)) ** 2) <= 1.0
  tissue = np.zeros(shape, np.uint8)
  tissue[np.broadcast_to(body, shape)] = _code("fat")
  tissue[np.broadcast_to(inner, shape)] = _code("soft")
  lungs, dome = _lung_masks(geo, grid)
  below = np.broadcast_to(z < dome[None] + 8, shape) & np.broadcast_to(inner, shape)
  tissue[below & np.broadcast_to((x < 35) & (y < geo.spine[0]), shape)] = _code("liver")
  (hx, hy, hz), (sx, sy, sz) = geo.heart
  rh = np.sqrt(((x - hx) / sx) ** 2 + ((y - hy) / sy) ** 2 + ((z - hz) / sz) ** 2)
  tissue[(rh > 1.0) & (rh < 1.08) & (tissue == _code("soft"))] = _code("fat")
  tissue[lungs] = _code("lung")
  span = geo.z_apex - geo.z_base
  z_car = geo.z_base + 0.62 * span
  y_tr = geo.spine[0] - geo.spine[1] - 20
  hila = [(z_car - 25, geo.lung[1], s * (geo.lung[0] - 0.5 * geo.lung[2])) for s in (-1, 1)]
  airway = np.broadcast_to((x ** 2 + (y - y_tr) ** 2 <= 8 ** 2) & (z > z_car), shape).copy()
  slab = (z[:, 0, 0] > z_car - 40) & (z[:, 0, 0] < z_car + 5)   # bronchi only run here
  for hilum in hila:
    airway[slab] |= _segment_distance((z[slab], y, x), (z_car, y_tr, 0.0), hilum) <= 6
  tissue[airway & ((tissue == _code("soft")) | lungs)] = _code("air")
  bone, marrow, disc = _spine(geo, grid)
  ribs, sternum = _ribs_and_sternum(geo, grid, inner)
  tissue[np.broadcast_to(disc, shape)] = _code("soft")
  tissue[np.broadcast_to(bone | ribs | sternum, shape)
         & np.broadcast_to(inner, shape)] = _code("bone")
  tissue[np.broadcast_to(marrow, shape)] = _code("marrow")
  lungs = tissue == _code("lung")
  hu = np.array([v[1] for v in sorted(TISSUES.values())], np.float32)[tissue]  # codes 0..11
  # Dependent (posterior) lung is a little denser than anterior lung.
  hu += np.where(lungs, 40.0 * (y - geo.lung[1]) / geo.lung[3], 0.0).astype(np.float32)
  return hu, tissue, lungs, hila


def _add_table(geo, grid, hu, tissue):
  _, y, x = grid
  half = 0.42 * geo.spacing[1] * max(geo.shape[1:])
  top = (y >= geo.table_y) & (y < geo.table_y + 4) & (np.abs(x) < half)
  rim = (y >= geo.table_y + 28) & (y < geo.table_y + 31) & (np.abs(x) < 0.8 * half)
  table = np.broadcast_to(top | rim, geo.shape) & (tissue == _code("air"))
  tissue[table] = _code("table")
  hu[table] = _hu("table")


def _vessel_points(rng, geo, hila, lungs, levels=7):
  """Sample points (mm, (N, 3) z/y/x) and radii (mm, (N,)) of a branching tree per lung.

  Trunks leave each hilum towards the upper, middle and lower lung; every branch
  splits in two, bent at random and pulled away from its hilum; a child whose
  end would leave the lung tries other random directions, then halves.
  """
  step = 0.5 * min(geo.spacing)
  spacing = np.array(geo.spacing)
  centre = np.array([0.5, -(geo.shape[1] - 1) / 2, -(geo.shape[2] - 1) / 2])
  span = geo.z_apex - geo.z_base

  def in_lung(p):
    idx = np.round(p / spacing - centre).astype(np.int64)
    ok = np.all((idx >= 0) & (idx < geo.shape), axis=1)
    idx = np.where(ok[:, None], idx, 0)
    return ok & lungs[idx[:, 0], idx[:, 1], idx[:, 2]]

  starts, dirs, roots = [], [], []
  for hilum in hila:
    side = np.sign(hilum[2])
    for dz, dy, dx in ((1.0, 0.1, 0.45), (0.1, -0.4, 1.0), (-1.0, 0.35, 0.45), (-0.6, 0.8, 0.3)):
      v = np.array([dz, dy, side * dx]) + rng.normal(0, 0.1, 3)
      starts.append(hilum)
      dirs.append(v / np.linalg.norm(v))
      roots.append(hilum)
  starts, dirs, roots = np.array(starts), np.array(dirs), np.array(roots)
  lengths = np.full(len(starts), 0.2 * span)
  rads = np.full(len(starts), 5.0)
  pts, radii = [], []
  for _ in range(levels):
    ends = starts + dirs * lengths[:, None]
    n = np.maximum(2, np.ceil(lengths / step)).astype(int)
    t = np.concatenate([np.arange(k) / k for k in n])
    seg = np.repeat(np.arange(len(starts)), n)
    pts.append(starts[seg] + t[:, None] * (ends - starts)[seg])
    radii.append(rads[seg])
    outward = ends - roots
    outward /= np.linalg.norm(outward, axis=1, keepdims=True) + 1e-6
    parent = np.concatenate([dirs, dirs])
    pull = np.concatenate([outward, outward])
    starts, roots = np.concatenate([ends, ends]), np.concatenate([roots, roots])
    lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.7, 0.85, 2 * len(lengths))
    rads = np.concatenate([rads, rads]) * 0.72
    dirs = np.zeros_like(parent)
    todo = np.ones(len(parent), bool)
    for spread in (0.6, 0.9, 1.3, 1.8):
      v = parent + rng.normal(0, spread, parent.shape) + 0.4 * pull
      v /= np.linalg.norm(v, axis=1, keepdims=True)
      take = todo & in_lung(starts + v * lengths[:, None])
      dirs[take] = v[take]
      todo &= ~take
    dirs[todo] = v[todo]
    lengths[todo] *= 0.5
  return np.concatenate(pts), np.concatenate(radii)


def _vessel_fraction(rng, geo, hila, lungs):
  """Partial-volume fraction (float32 (D,H,W), 0..1) of blood vessels."""
  pts, radii = _vessel_points(rng, geo, hila, lungs)
  spacing = np.array(geo.spacing)
  idx = np.round(pts / spacing - [0.5, -(geo.shape[1] - 1) / 2, -(geo.shape[2] - 1) / 2])
  idx = idx.astype(np.int64)
  inside = np.all((idx >= 0) & (idx < geo.shape), axis=1)
  idx, radii = idx[inside], radii[inside]
  step = 0.5 * spacing.min()
  # Each point carries its share of vessel volume (slightly thickened so thin
  # vessels stay visible at coarse resolution), spread by a Gaussian matched to
  # the radius: thick vessels get a wide kernel, thin ones the scanner's PSF.
  weight = 2.5 * np.pi * radii ** 2 * step / np.prod(spacing)
  sigmas = np.maximum(0.6, np.round(2 * radii[:, None] / (1.18 * spacing)) / 2)
  frac = np.zeros(geo.shape, np.float32)
  for sig in np.unique(sigmas, axis=0):
    sel = np.all(sigmas == sig, axis=1)
    # Filter only the box around this class's points (thick vessels sit near the hila).
    lo = np.maximum(idx[sel].min(0) - np.ceil(3 * sig).astype(int) - 1, 0)
    hi = np.minimum(idx[sel].max(0) + np.ceil(3 * sig).astype(int) + 2, geo.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    acc = np.zeros(hi - lo, np.float32)
    np.add.at(acc, tuple((idx[sel] - lo).T), weight[sel].astype(np.float32))
    frac[box] += ndimage.gaussian_filter(acc, sig, truncate=3.0)
  return np.clip(frac, 0.0, 1.0)


def _smooth_field(rng, geo, cell_mm):
  """Smooth random field, float32 (D, H, W), unit std, correlation length ~ cell_mm.

  White noise on a coarse grid of `cell_mm` cells, interpolated with a Gaussian
  kernel one cell wide, axis by axis (three small matrix products).
  """
  mats = []
  for n, sp in zip(geo.shape, geo.spacing, strict=True):
    pos = (np.arange(n) + 0.5) * sp / cell_mm
    cells = np.arange(-2, int(np.ceil(pos[-1])) + 3)
    mats.append(np.exp(-0.5 * (pos[:, None] - cells[None, :]) ** 2).astype(np.float32))
  field = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
  (d, h, w), (cz, cy, cx) = geo.shape, field.shape
  # Threaded BLAS only slows these small products down on a busy machine.
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    field = (field.reshape(cz * cy, cx) @ mats[2].T).reshape(cz, cy * w)
    field = (mats[0] @ field).reshape(d, cy, w).transpose(1, 0, 2).reshape(cy, d * w)
    field = (mats[1] @ field).reshape(h, d, w).transpose(1, 0, 2)
  return np.ascontiguousarray(field / field.std())


def _texture(rng, geo, sigma_mm):
  """Fine random texture, float32 (D, H, W), unit std: white noise blurred by sigma_mm."""
  field = ndimage.gaussian_filter(rng.standard_normal(geo.shape, dtype=np.float32),
                                  sigma_mm / np.array(geo.spacing), truncate=3.0)
  return field / field.std()


def _lesions(rng, geo, grid, lungs, severity):
  """COVID-like lesion mask (bool), its HU values and consolidation mask."""
  z, y, _ = grid
  fraction = rng.uniform(*TARGET_FRACTIONS[severity])
  # 1 - (lung mask blurred over ~10 mm): about 0.5 at the pleura, 0 deep inside.
  pleura = 1.0 - ndimage.gaussian_filter(lungs.astype(np.float32), 10.0 / np.array(geo.spacing))
  blobs = _smooth_field(rng, geo, rng.uniform(9.0, 14.0))
  # Subpleural, posterior and lower-lobe predominance, as typical of COVID-19.
  span = geo.z_apex - geo.z_base
  score = (blobs + 2.0 * pleura
           + 0.35 * (y - geo.lung[1]) / geo.lung[3]
           - 0.35 * (z - geo.z_base) / span)
  vals = score[lungs]
  thr = np.quantile(vals, 1.0 - fraction)
  lesion = lungs & (score > thr)
  strength = np.clip((score - thr) / 0.8, 0.0, 1.0) ** 0.7
  texture = 25.0 * _texture(rng, geo, 3.0)
  hu = -640.0 + 330.0 * strength + texture
  share = CONSOLIDATION_SHARE[severity]
  consolidation = np.zeros_like(lesion)
  if share:
    thr_c = np.quantile(score[lesion], 1.0 - share)
    consolidation = lesion & (score > thr_c)
    hu = np.where(consolidation, -30.0 + 40.0 * np.clip((score - thr_c) / 0.5, 0, 1) + texture, hu)
  return lesion, hu.astype(np.float32), consolidation


def _nodules(rng, geo, grid, lungs, count):
  """Up to `count` solid nodule spheres well inside the lungs: (bool mask, number placed)."""
  z, y, x = grid
  depth = ndimage.distance_transform_edt(lungs, sampling=geo.spacing)
  candidates = np.argwhere(depth > 12.0)
  mask = np.zeros(geo.shape, bool)
  chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
  for i in chosen:
    cz, cy, cx = (z.ravel()[candidates[i][0]], y.ravel()[candidates[i][1]],
                  x.ravel()[candidates[i][2]])
    radius = rng.uniform(3.0, 7.0)
    mask |= (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
  return mask, len(chosen)


def _resolve_shape(rng, shape, size, n_slices):
  if shape is not None and (size is not None or n_slices is not None):
    raise ValueError("make_scan: give either shape or size/n_slices, not both")
  if shape is None:
    size = int(rng.integers(4, 9)) * 16 if size is None else size
    n_slices = int(rng.integers(40, 91)) if n_slices is None else n_slices
    shape = (n_slices, size, size)
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 16:
    raise ValueError(f"make_scan: shape must be 3 sizes >= 16, got {shape}")
  return shape


def make_scan(seed, *, kind, severity=None, shape=None, size=None, n_slices=None,
              noise_hu=20.0, table=True, nodules=None):
  """One synthetic chest CT.

  Args:
    seed: int or sequence of ints for `np.random.default_rng`; same seed, same scan.
    kind: 'covid' or 'non-covid'.
    severity: covid only, 0..3 (mild..critical); None draws one uniformly.
    shape: (D, H, W) voxels; or leave None and give `size` (in-plane, square)
      and/or `n_slices`; unset sizes are drawn: size in {64, 80, ..., 128},
      slices in 40..90. The field of view is about 340-390 mm and the volume
      about 270-330 mm high, whatever the voxel count, so `size=512` gives a
      realistic 0.7 mm pixel.
    noise_hu: std of the white Gaussian scanner noise in HU.
    table: draw the patient table below the body.
    nodules: non-covid only, number of solid nodules; None draws 0 (half the
      scans) or 1..3.

  Returns:
    volume: float32 (D, H, W), HU in [-1024, 3071].
    mask: uint8 (D, H, W), 1 on COVID lesions (ground glass and consolidation).
    info: dict with 'covid' (0/1), 'severity' (0..3, -1 for non-covid),
      'lesion_fraction' (lesion voxels / lung voxels), 'lung_voxels',
      'nodules' (number placed), 'spacing' ((z, y, x) mm), 'tissue' (uint8 (D, H, W) labels of
      `TISSUES`, after lesions, before blur and noise), 'seed'.
  """
  if kind not in KINDS:
    raise ValueError(f"make_scan: kind must be one of {KINDS}, got {kind!r}")
  rng = np.random.default_rng(seed)
  covid = kind == "covid"
  if covid:
    severity = int(rng.integers(4)) if severity is None else int(severity)
    if not 0 <= severity < 4:
      raise ValueError(f"make_scan: severity must be 0..3, got {severity}")
  elif severity is not None:
    raise ValueError('make_scan: severity is only defined for kind="covid"')
  if covid and nodules:
    raise ValueError('make_scan: nodules are only drawn for kind="non-covid"')
  geo = _sample_geometry(rng, _resolve_shape(rng, shape, size, n_slices))
  grid = _grid(geo)
  hu, tissue, lungs, hila = _anatomy(geo, grid)
  if not lungs.any():
    raise ValueError(f"make_scan: shape {geo.shape} is too coarse to hold the lungs")
  if table:
    _add_table(geo, grid, hu, tissue)
  hu += np.where(lungs, 15.0 * _texture(rng, geo, 3.0), 0.0).astype(np.float32)
  mask = np.zeros(geo.shape, np.uint8)
  n_nodules = 0
  if covid:
    lesion, lesion_hu, consolidation = _lesions(rng, geo, grid, lungs, severity)
    hu[lesion] = lesion_hu[lesion]
    tissue[lesion] = _code("ggo")
    tissue[consolidation] = _code("consolidation")
    mask[lesion] = 1
  else:
    wanted = (0 if rng.random() < 0.5 else int(rng.integers(1, 4))) if nodules is None else nodules
    if wanted:
      solid, n_nodules = _nodules(rng, geo, grid, lungs, wanted)
      hu[solid] = _hu("nodule")
      tissue[solid] = _code("nodule")
  vessels = _vessel_fraction(rng, geo, hila, lungs) * lungs
  hu += vessels * (_hu("vessel") - hu)
  tissue[vessels > 0.5] = _code("vessel")
  # Scanner point-spread function, then noise.
  hu = ndimage.gaussian_filter(hu, (0.4, 0.6, 0.6), truncate=3.0)
  hu += rng.standard_normal(geo.shape, dtype=np.float32) * np.float32(noise_hu)
  hu = np.clip(hu, *HU_RANGE).astype(np.float32)
  n_lung = int(lungs.sum())
  info = {
      "covid": int(covid), "severity": severity if covid else -1,
      "lesion_fraction": float(mask.sum() / max(n_lung, 1)), "lung_voxels": n_lung,
      "nodules": n_nodules, "spacing": tuple(float(s) for s in geo.spacing),
      "tissue": tissue, "seed": seed,
  }
  return hu, mask, info


def lung_window(hu, level=-600.0, width=1500.0):
  """Map HU to uint8 0..255 with a lung window (default L -600, W 1500)."""
  scaled = (np.asarray(hu, np.float32) - (level - width / 2)) / width * 255.0
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def plot_classes(path, seed=0, size=192, n_slices=80):
  """Write a PNG of axial and coronal slices for each class, lesion outline in red.

  Rows: non-covid (with two nodules), mild, moderate, severe, critical; the
  axial slice is 40 % up the lungs, the coronal one 60 % of the way from the
  front to the back of the lungs.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cases = [("non-covid", None)] + [("covid", s) for s in range(4)]
  fig, axes = plt.subplots(len(cases), 2, figsize=(7.0, 3.2 * len(cases)),
                           gridspec_kw={"width_ratios": [1, 1]})
  for row, (kind, severity) in enumerate(cases):
    vol, mask, info = make_scan((seed, row), kind=kind, severity=severity,
                                size=size, n_slices=n_slices,
                                nodules=2 if severity is None else None)
    lungs = np.isin(info["tissue"], [_code(n) for n in ("lung", "ggo", "consolidation", "vessel")])
    zs, ys = np.nonzero(lungs.any(2).any(1))[0], np.nonzero(lungs.any(2).any(0))[0]
    k = int(zs[0] + 0.4 * (zs[-1] - zs[0]))
    r = int(ys[0] + 0.6 * (ys[-1] - ys[0]))
    sz, px, _ = info["spacing"]
    title = "non-covid" if severity is None else SEVERITY_NAMES[severity]
    for col, (img, msk, aspect, where) in enumerate([
        (vol[k], mask[k], 1.0, f"axial z={k}"),
        (vol[:, r][::-1], mask[:, r][::-1], sz / px, f"coronal y={r}")]):
      ax = axes[row, col]
      ax.imshow(lung_window(img), cmap="gray", vmin=0, vmax=255, aspect=aspect,
                interpolation="nearest")
      if msk.any():
        ax.contour(msk, levels=[0.5], colors="red", linewidths=0.7)
      ax.set_title(f"{title} ({100 * info['lesion_fraction']:.1f} %), {where}", fontsize=8)
      ax.axis("off")
  fig.suptitle("covid3d phantom, lung window L-600/W1500, lesion mask in red", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)

