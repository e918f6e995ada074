"""Building blocks of the on-device augmentation: filters, resampling, fields.

Every function here is pure and traceable (``jax.jit``, ``jax.vmap``); shapes
and filter sizes are static, random draws and parameters may be traced.
Volumes are float32 ``(D, H, W)``; coordinates and displacements are in voxels,
ordered like the array axes.
"""
import functools
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Sigma = Union[float, Sequence[float], jax.Array]

# scipy.ndimage boundary mode -> jnp.pad mode (the same extension of the input).
_PAD_MODES = {"constant": "constant", "reflect": "symmetric", "mirror": "reflect",
              "nearest": "edge", "wrap": "wrap"}
# Shift-and-add wins for narrow kernels, the dense filter matrix for wide ones
# (docs/augment.md, "gaussian_filter: which formulation").
_MAX_SHIFT_TAPS = 9
_HIGHEST = lax.Precision.HIGHEST


def kernel_radius(sigma: float, truncate: float = 4.0) -> int:
  """Half-width of scipy's Gaussian kernel: ``int(truncate * sigma + 0.5)``."""
  return int(truncate * float(sigma) + 0.5)


def _per_axis(value, ndim: int, name: str):
  """A scalar or a length-``ndim`` sequence as a tuple of ``ndim`` entries."""
  if isinstance(value, (list, tuple)):
    if len(value) != ndim:
      raise ValueError(f"{name}: {len(value)} values for an array of {ndim} axes")
    return tuple(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1:
    if value.shape[0] != ndim:
      raise ValueError(f"{name}: {value.shape[0]} values for an array of {ndim} axes")
    return tuple(value[i] for i in range(ndim))
  return (value,) * ndim


def _is_static(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating))


def gaussian_weights(sigma, radius: int, truncate: float = 4.0) -> jax.Array:
  """Normalised 1-D Gaussian taps at offsets ``-radius..radius``, float32.

  Taps beyond ``int(truncate * sigma + 0.5)`` are zero, so a traced ``sigma``
  with a static upper bound on the radius gives scipy's kernel exactly.
  """
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  own_radius = jnp.floor(truncate * sigma + 0.5)
  w = jnp.where(jnp.abs(offsets) <= own_radius, jnp.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
  return w / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("n", "mode"))
def filter_matrix(weights: jax.Array, n: int, mode: str = "constant") -> jax.Array:
  """``(n, n)`` matrix ``M`` with ``M @ x`` = scipy ``correlate1d(x, weights, mode)``.

  Built by scattering each tap onto the column its (boundary-folded) source
  index lands on; with ``mode='constant'`` taps that fall outside are dropped.
  """
  taps = weights.shape[0]
  radius = taps // 2
  if mode not in _PAD_MODES:
    raise ValueError(f"mode: {mode!r} is not one of {sorted(_PAD_MODES)}")
  pad = "constant" if mode == "constant" else _PAD_MODES[mode]
  kw = {"constant_values": -1} if mode == "constant" else {}
  source = np.pad(np.arange(n), radius, mode=pad, **kw)
  rows = np.repeat(np.arange(n), taps)
  cols = np.stack([source[i:i + taps] for i in range(n)]).reshape(-1)
  tap_index = np.tile(np.arange(taps), n)
  keep = cols >= 0
  m = jnp.zeros((n, n), jnp.float32)
  return m.at[rows[keep], cols[keep]].add(weights[tap_index[keep]])


@functools.partial(jax.jit, static_argnames=("axis", "mode"))
def _shift_filter(x: jax.Array, weights: jax.Array, axis: int, mode: str) -> jax.Array:
  # Jitted: called eagerly, each of the many slices would compile on its own.
  radius = weights.shape[0] // 2
  widths = [(0, 0)] * x.ndim
  widths[axis] = (radius, radius)
  xp = jnp.pad(x, widths, mode=_PAD_MODES[mode])
  n = x.shape[axis]
  out = weights[0] * lax.slice_in_dim(xp, 0, n, axis=axis)
  for i in range(1, weights.shape[0]):
    out = out + weights[i] * lax.slice_in_dim(xp, i, i + n, axis=axis)
  return out


def gaussian_filter(x: jax.Array, sigma: Sigma, truncate: float = 4.0, *,
                    mode: str = "constant", max_sigma: float = None,
                    method: str = "auto") -> jax.Array:
  """Separable Gaussian smoothing along every axis of ``x``.

  Equals ``scipy.ndimage.gaussian_filter(x, sigma, mode=mode, truncate=truncate)``
  (``cval=0``) to float32 rounding.

  Args:
    x: float array, any number of axes (a volume is ``(D, H, W)``).
    sigma: standard deviation in voxels; a scalar or one per axis. Python
      numbers fix the kernel width; a traced value needs ``max_sigma``.
    truncate: kernel half-width in standard deviations, as in scipy.
    mode: boundary extension: 'constant' (zeros), 'reflect', 'mirror',
      'nearest' or 'wrap' (scipy's meaning).
    max_sigma: static upper bound of a traced ``sigma``; fixes the kernel width.
    method: 'shift' (shift-and-add over the taps), 'matmul' (a dense
      ``(n, n)`` filter matrix per axis) or 'auto' (shift up to 9 taps, else
      matmul; see docs/augment.md for the measurements behind the choice).

  Returns:
    float32 array of ``x``'s shape.
  """
  if mode not in _PAD_MODES:
    raise ValueError(f"gaussian_filter: mode {mode!r} is not one of {sorted(_PAD_MODES)}")
  if method not in ("auto", "shift", "matmul"):
    raise ValueError(f"gaussian_filter: method {method!r} is not auto, shift or matmul")
  x = jnp.asarray(x, jnp.float32)
  sigmas = _per_axis(sigma, x.ndim, "gaussian_filter: sigma")
  matrices = {}
  for axis, s in enumerate(sigmas):
    if _is_static(s):
      if s < 0:
        raise ValueError(f"gaussian_filter: sigma {s} < 0")
      if s == 0:
        continue
      bound = s
    elif max_sigma is None:
      raise ValueError("gaussian_filter: a traced sigma needs a static max_sigma")
    else:
      bound = max_sigma
    weights = gaussian_weights(s, kernel_radius(bound, truncate), truncate)
    taps = weights.shape[0]
    if method == "shift" or (method == "auto" and taps <= _MAX_SHIFT_TAPS):
      x = _shift_filter(x, weights, axis, mode)
    else:
      matrices[axis] = filter_matrix(weights, x.shape[axis], mode)
  if matrices:
    # One einsum for all matrix axes lets XLA order the contractions without
    # a transpose per axis.
    letters = "abcdefghijklmnopqrstuvwxyz"[:x.ndim]
    out = "".join(letters[a].upper() if a in matrices else letters[a] for a in range(x.ndim))
    spec = ",".join(letters[a].upper() + letters[a] for a in matrices)
    x = jnp.einsum(f"{spec},{letters}->{out}", *matrices.values(), x, precision=_HIGHEST)
  return x


def identity_grid(shape: Sequence[int]) -> jax.Array:
  """Voxel coordinates ``(len(shape), *shape)`` float32: ``grid[i][p] = p[i]``."""
  return jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape],
                                indexing="ij"))


def _corner_indices(coords: jax.Array, shape: Sequence[int]):
  """Lower/upper neighbour indices and the fraction along each axis (edge-clamped)."""
  lo, hi, frac = [], [], []
  for c, n in zip(coords, shape, strict=True):
    c = jnp.clip(c, 0.0, n - 1.0)
    i0 = jnp.clip(jnp.floor(c), 0, max(n - 2, 0)).astype(jnp.int32)
    lo.append(i0)
    hi.append(jnp.minimum(i0 + 1, n - 1))
    frac.append(c - i0.astype(jnp.float32))
  return lo, hi, frac


def _flat_index(idx, shape):
  flat = idx[0]
  for i, n in zip(idx[1:], shape[1:], strict=True):
    flat = flat * n + i
  return flat


def _lerp(a, b, t):
  # a + t (b - a) keeps a constant region exactly constant.
  return a + t * (b - a)


@functools.partial(jax.jit, static_argnames=("order",))
def sample(volume: jax.Array, coords: jax.Array, order: int = 1,
           labels: jax.Array = None):
  """Sample ``volume`` (and optionally ``labels``) at voxel coordinates.

  Coordinates outside the volume take the edge value (scipy mode 'nearest').

  Args:
    volume: ``(D, H, W)`` array; interpolated with spline ``order`` 0 or 1.
    coords: ``(3, *out_shape)`` float32 voxel coordinates.
    order: 0 (nearest neighbour) or 1 (trilinear) for ``volume``.
    labels: optional integer ``(D, H, W)`` array of the same shape as
      ``volume``, always sampled nearest-neighbour at the same coordinates.

  Returns:
    ``volume`` sampled, ``(*out_shape)`` of its dtype; or the pair
    ``(volume, labels)`` sampled when ``labels`` is given.
  """
  if order not in (0, 1):
    raise ValueError(f"sample: order {order} is not 0 or 1")
  if coords.shape[0] != volume.ndim:
    raise ValueError(f"sample: coords {coords.shape} for a volume of {volume.ndim} axes")
  if labels is not None and labels.shape != volume.shape:
    raise ValueError(f"sample: labels {labels.shape} != volume {volume.shape}")
  shape = volume.shape
  lo, hi, frac = _corner_indices(coords, shape)
  # scipy's order 0 rounds half up: floor(c + 0.5).
  nearest = [jnp.where(t >= 0.5, h, l) for l, h, t in zip(lo, hi, frac, strict=True)]
  near_flat = _flat_index(nearest, shape)
  if order == 0:
    out = volume.reshape(-1)[near_flat]
  else:
    flat = volume.reshape(-1)

    def corner(bits):
      return flat[_flat_index([h if b else l for b, l, h in zip(bits, lo, hi, strict=True)], shape)]

    def interp(axis, bits):
      if axis == volume.ndim:
        return corner(bits)
      return _lerp(interp(axis + 1, bits + (0,)), interp(axis + 1, bits + (1,)), frac[axis])

    out = interp(0, ()).astype(volume.dtype)
  if labels is None:
    return out
  return out, labels.reshape(-1)[near_flat]


@functools.partial(jax.jit, static_argnames=("order",))
def warp(volume: jax.Array, displacement: jax.Array, order: int = 1) -> jax.Array:
  """Resample ``volume`` at identity grid + ``displacement``.

  Equals ``scipy.ndimage.map_coordinates(volume, grid + displacement,
  order=order, mode='nearest')`` for order 0 and 1.

  Args:
    volume: ``(D, H, W)`` array (float32, or integer labels with order 0).
    displacement: ``(3, D, H, W)`` float32, voxels along (D, H, W).
    order: 0 (nearest neighbour) or 1 (trilinear).

  Returns:
    ``(D, H, W)`` array of ``volume``'s dtype.
  """
  if displacement.shape != (volume.ndim,) + volume.shape:
    raise ValueError(f"warp: displacement {displacement.shape} does not match "
                     f"({volume.ndim}, *{volume.shape})")
  return sample(volume, identity_grid(volume.shape) + displacement, order)


# --- quarter turns ----------------------------------------------------------

# Rotation "about axis a" turns the plane of the two other axes, in this order,
# like np.rot90(x, k, axes=_QUARTER_PLANES[a]).
_QUARTER_PLANES = ((1, 2), (2, 0), (0, 1))


def quarter_turn_matrix(axis: int, k) -> jax.Array:
  """Sampling matrix of ``np.rot90(x, k, axes=_QUARTER_PLANES[axis])``, centred.

  For a shape-preserving turn, ``out[p] = x[c + A (p - c)]`` with
  ``c = (shape - 1) / 2``; ``A`` is a signed permutation (int32 3 x 3).
  """
  b, c = _QUARTER_PLANES[axis]
  one = np.eye(3, dtype=np.int32)
  quarter = one.copy()  # np.rot90 k=1: out[.., p_b, .., p_c] = x[.., p_c, .., -p_b]
  quarter[b], quarter[c] = one[c], -one[b]
  powers = jnp.asarray(np.stack([np.linalg.matrix_power(quarter, i) for i in range(4)]))
  return powers[jnp.asarray(k) % 4]


def quarter_turns_matrix(ks) -> jax.Array:
  """Centred sampling matrix of the turns ``ks`` about axes 0, 1, 2, applied in order."""
  a = quarter_turn_matrix(0, ks[0])
  a = a @ quarter_turn_matrix(1, ks[1])
  return a @ quarter_turn_matrix(2, ks[2])


def rot90(x: jax.Array, ks) -> jax.Array:
  """Quarter turns ``ks = (k0, k1, k2)`` about axes 0, 1 and 2, in that order.

  A turn about axis 0 is ``np.rot90(x, k0, axes=(1, 2))``, about axis 1
  ``axes=(2, 0)``, about axis 2 ``axes=(0, 1)``. With Python ints the result
  has the turned shape (like numpy, e.g. ``(8, 16, 32)`` turned once about
  axis 0 is ``(8, 32, 16)``). Traced ``ks`` (inside jit/vmap) need a result
  shape that does not depend on them: every turn by an odd ``k`` must be in a
  plane of two equal sizes; a cube always qualifies.

  Args:
    x: ``(D, H, W)`` array.
    ks: three ints, or an int array of shape (3,).

  Returns:
    The turned array, ``x``'s dtype.
  """
  if x.ndim != 3:
    raise ValueError(f"rot90: x must be (D, H, W), got shape {x.shape}")
  if all(isinstance(k, (int, np.integer)) for k in ks):
    for axis, k in enumerate(ks):
      x = jnp.rot90(x, int(k), axes=_QUARTER_PLANES[axis])
    return x
  if len(set(x.shape)) != 1:
    raise ValueError(f"rot90: traced ks need a cubic volume, got shape {x.shape}")
  centre = (x.shape[0] - 1) / 2.0
  grid = identity_grid(x.shape) - centre
  coords = jnp.einsum("ij,j...->i...", quarter_turns_matrix(ks).astype(jnp.float32), grid) + centre
  return sample(x, coords, order=0)


def rotation_matrix(angle_degrees, plane: Sequence[int]) -> jax.Array:
  """Centred 3 x 3 sampling matrix of ``scipy.ndimage.rotate(x, angle, axes=plane)``.

  ``out[p] = x[c + R (p - c)]``; ``R`` rotates the plane (sorted axes a < b)
  with ``[[cos, sin], [-sin, cos]]`` and leaves the third axis alone.
  """
  a, b = sorted(plane)
  if a == b or not 0 <= a < b <= 2:
    raise ValueError(f"rotation plane {plane} is not two distinct axes of 0, 1, 2")
  theta = jnp.deg2rad(jnp.asarray(angle_degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  r = jnp.eye(3, dtype=jnp.float32)
  r = r.at[a, a].set(cos).at[a, b].set(sin).at[b, a].set(-sin).at[b, b].set(cos)
  return r


# --- elastic displacement ---------------------------------------------------

def coarse_knots(n: int, spacing: int) -> np.ndarray:
  """Integer knot positions from 0 to n-1, at most ``spacing`` apart."""
  count = max(2, math.ceil((n - 1) / spacing) + 1) if n > 1 else 1
  return np.unique(np.round(np.linspace(0, n - 1, count)).astype(np.int64))


def linear_interpolation_matrix(knots: np.ndarray, n: int) -> np.ndarray:
  """``(n, len(knots))`` float32: piecewise-linear interpolation from the knots."""
  m = np.zeros((n, len(knots)), np.float32)
  if len(knots) == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(n)
  j = np.clip(np.searchsorted(knots, pos, side="right") - 1, 0, len(knots) - 2)
  t = (pos - knots[j]) / (knots[j + 1] - knots[j])
  m[pos, j] = 1.0 - t
  m[pos, j + 1] += t
  return m


def _smoothing_rows(n: int, sigma: float, truncate: float, knots=None) -> np.ndarray:
  """Rows (at ``knots``, default all voxels) of scipy's 1-D Gaussian filter matrix."""
  r = kernel_radius(sigma, truncate)
  w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  w /= w.sum()
  offsets = np.arange(n)[None, :] - np.arange(n)[:, None]
  full = np.where(np.abs(offsets) <= r, w[np.clip(offsets + r, 0, 2 * r)], 0.0)
  return full if knots is None else full[knots]


def _covariance_root(rows: np.ndarray) -> np.ndarray:
  """Symmetric square root of ``rows @ rows.T`` (float64 eigh, clipped at 0)."""
  vals, vecs = np.linalg.eigh(rows @ rows.T)
  return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


ELASTIC_METHODS = ("exact", "coarse", "covariance")


def elastic_displacement(key: jax.Array, shape: Sequence[int], alpha, sigma: float, *,
                         truncate: float = 4.0, method: str = "exact",
                         grid: int = 8) -> jax.Array:
  """The smoothed random displacement field of elastic deformation, in voxels.

  Per axis: uniform(-1, 1) noise at every voxel, smoothed with
  ``gaussian_filter(noise, sigma, truncate)`` (zeros outside), times ``alpha``.

  Args:
    key: ``jax.random`` key.
    shape: static volume shape ``(D, H, W)``.
    alpha: scale, a scalar or one per axis (3,); may be traced.
    sigma: static smoothing standard deviation in voxels.
    truncate: kernel half-width in standard deviations (scipy's meaning).
    method: 'exact' (full-resolution noise and smoothing); 'coarse' (the same
      noise, smoothed only at knots at most ``grid`` voxels apart, then
      trilinear interpolation: the knots carry the exact values); 'covariance'
      (the knot values drawn directly as Gaussian with the exact covariance of
      the 'coarse' knot values, no full-resolution noise: the fastest, equal to
      'coarse' in distribution up to the central limit theorem, not per key).
    grid: knot spacing in voxels for 'coarse' and 'covariance'.

  Returns:
    ``(3, D, H, W)`` float32 displacement in voxels along (D, H, W).
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3:
    raise ValueError(f"elastic_displacement: shape {shape} is not (D, H, W)")
  if method not in ELASTIC_METHODS:
    raise ValueError(f"elastic_displacement: method {method!r} not in {ELASTIC_METHODS}")
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (3,))
  if method == "exact":
    noise = jax.random.uniform(key, (3,) + shape, jnp.float32, -1.0, 1.0)
    field = jax.vmap(lambda u: gaussian_filter(u, float(sigma), truncate))(noise)
    return field * alpha[:, None, None, None]
  knots = [coarse_knots(n, grid) for n in shape]
  rows = [_smoothing_rows(n, float(sigma), truncate, k) for n, k in zip(shape, knots, strict=True)]
  if method == "coarse":
    noise = jax.random.uniform(key, (3,) + shape, jnp.float32, -1.0, 1.0)
    mats = [jnp.asarray(r, jnp.float32) for r in rows]
  else:
    # Var(U(-1, 1)) = 1/3 per voxel; knot covariance = (1/3) (S S^T) per axis, Kronecker.
    noise = jax.random.normal(key, (3,) + tuple(len(k) for k in knots), jnp.float32)
    mats = [jnp.asarray(_covariance_root(r) * (1 / 3) ** (1 / 6), jnp.float32) for r in rows]
  # One einsum per stage lets XLA order the three contractions itself, which
  # beats three tensordots with their transposes.
  coarse = jnp.einsum("ai,bj,ck,nijk->nabc", *mats, noise, precision=_HIGHEST)
  coarse = coarse * alpha[:, None, None, None]
  up = [jnp.asarray(linear_interpolation_matrix(k, n)) for n, k in zip(shape, knots, strict=True)]
  return jnp.einsum("ia,jb,kc,nabc->nijk", *up, coarse, precision=_HIGHEST)
