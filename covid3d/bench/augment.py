"""``python -m covid3d.bench augment``: on-device augmentation against scipy.

Default run: the time per volume of the whole augmentation (one example under
``jit``; a batch through ``augment_batch``; a batch through ``vmap(augment)``)
and of the elastic deformation alone, jitted, on the current device, beside
the classic scipy elastic deformation (``gaussian_filter`` of uniform noise
per axis + ``map_coordinates`` order 1) at the same size, and the ratios.

``--stats``: displacement statistics of the elastic field (sigma 35) under the
code's, the classic and the max-displacement parameterisation, and the error
of the coarse-grid fields against the exact one. ``--filters``: the
formulations of ``gaussian_filter`` timed against each other.
``--montage FILE``: a PNG of the phantom under each augmentation.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import ndimage

from covid3d import augment as aug
from covid3d import augment_ops as ops
from covid3d.bench.common import device_line, print_table

# COV19-CT-DB normalisation (docs/method.md) applied after the [-1000, 500] HU clip.
_MEAN, _STD = 0.3971, 0.3207


def register(subparsers):
  p = subparsers.add_parser("augment", help="on-device augmentation vs scipy elastic")
  p.add_argument("--size", type=int, default=224, help="cube edge of the output, voxels")
  p.add_argument("--large", type=int, default=None,
                 help="cube edge of the crop source (default size * 256 / 224)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--reps", type=int, default=5, help="timed runs per row (median)")
  p.add_argument("--scipy-reps", type=int, default=1, help="timed runs of scipy (0: skip)")
  p.add_argument("--stats", action="store_true", help="elastic displacement statistics")
  p.add_argument("--filters", action="store_true", help="time gaussian_filter formulations")
  p.add_argument("--montage", default=None, help="write a PNG montage to this path")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=run)


def _timed(fn, args_of_rep, reps):
  """Median and mean seconds of ``fn(*args_of_rep(r))`` over ``reps`` runs after a warmup."""
  jax.block_until_ready(fn(*args_of_rep(0)))
  times = []
  for r in range(1, reps + 1):
    args = args_of_rep(r)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.mean(times))


def scipy_elastic(rng, volume, alpha, sigma):
  """The classic elastic deformation: scipy smoothing of uniform noise, order-1 warp."""
  shape = volume.shape
  disp = [ndimage.gaussian_filter(rng.uniform(-1, 1, shape).astype(np.float32), sigma,
                                  mode="constant") * alpha for _ in shape]
  grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
  coords = [g + d for g, d in zip(grid, disp, strict=True)]
  return ndimage.map_coordinates(volume, coords, order=1, mode="nearest")


def _timing_rows(args):
  size, batch = args.size, args.batch
  large = args.large or round(size * 256 / 224)
  cfg = aug.default_config()
  rng = np.random.default_rng(args.seed)
  vol = jnp.asarray(rng.random((size,) * 3, np.float32))
  vol_l = jnp.asarray(rng.random((large,) * 3, np.float32))
  vols, vols_l = jnp.stack([vol] * batch), jnp.stack([vol_l] * batch)
  key = jax.random.key(args.seed)
  keys = lambda r: jax.random.fold_in(key, r)  # noqa: E731

  one = jax.jit(lambda k, v, vl: aug.augment(k, v, None, cfg, volume_large=vl)[0])
  batched = jax.jit(lambda k, v, vl: aug.augment_batch(k, v, None, cfg, volumes_large=vl)[0])
  vmapped = jax.jit(jax.vmap(lambda k, v, vl: aug.augment(k, v, None, cfg, volume_large=vl)[0]))

  def elastic_alone(method):
    c = aug.default_config()
    c.elastic.method = method

    def fn(k, v):
      d = aug.elastic_field(k, 7.0, 0.0, v.shape, c)
      return ops.warp(v, d, order=1)
    return jax.jit(fn)

  rows = []

  def add(name, per, seconds):
    med, mean = seconds
    rows.append({"what": name, "per_volume_s": med / per, "mean_s": mean / per})

  add("augment, 1 example (jit)", 1, _timed(one, lambda r: (keys(r), vol, vol_l), args.reps))
  add(f"augment_batch, B={batch}", batch,
      _timed(batched, lambda r: (keys(r), vols, vols_l), args.reps))
  add(f"vmap(augment), B={batch}", batch, _timed(
      vmapped, lambda r: (jax.random.split(keys(r), batch), vols, vols_l), args.reps))
  for method in ops.ELASTIC_METHODS:
    add(f"elastic alone, {method} (jit)", 1,
        _timed(elastic_alone(method), lambda r: (keys(r), vol), args.reps))
  if args.scipy_reps > 0:
    v = np.asarray(vol)
    times = []
    for _ in range(args.scipy_reps):
      t0 = time.perf_counter()
      scipy_elastic(rng, v, 7.0, 35.0)
      times.append(time.perf_counter() - t0)
    scipy_s = float(np.median(times))
    rows.append({"what": "scipy elastic (gaussian_filter + map_coordinates)",
                 "per_volume_s": scipy_s, "mean_s": float(np.mean(times))})
    for row in rows:
      row["scipy_ratio"] = scipy_s / row["per_volume_s"]
  return rows


def _length(d):
  return np.sqrt(np.sum(np.square(np.asarray(d, np.float64)), axis=0))


def _stats_rows(args):
  """Displacement lengths (voxels) at size^3, sigma 35, for each parameterisation."""
  shape = (args.size,) * 3
  sigma = 35.0
  key = jax.random.key(args.seed)
  rows = []
  code_t = aug.code_truncate(sigma)
  for units, truncate in (("code", code_t), ("voxels", 4.0)):
    scale = np.float32(args.size / 2.0) if units == "code" else np.float32(1.0)
    unit = jax.jit(lambda k, t=truncate, s=scale: ops.elastic_displacement(
        k, shape, s, sigma, truncate=t, method="exact"))(key)
    length = _length(unit)
    for alpha in (1.0, 7.0):
      rows.append({"units": units, "param": f"alpha {alpha:g}", "truncate": truncate,
                   "mean_vox": alpha * length.mean(), "max_vox": alpha * length.max(),
                   "std_component_vox": alpha * float(np.std(np.asarray(unit)))})
  cfg = aug.default_config()
  cfg.elastic.units = "max"
  for target in cfg.elastic.max_displacement:
    d = jax.jit(lambda k, m=target: aug.elastic_field(k, 0.0, m, shape, cfg))(key)
    length = _length(d)
    rows.append({"units": "max", "param": f"max {target:g}", "truncate": code_t,
                 "mean_vox": length.mean(), "max_vox": length.max(),
                 "std_component_vox": float(np.std(np.asarray(d)))})
  return rows


def _error_rows(args, grids=(4, 8, 16)):
  """Coarse-grid fields against the exact field, code units, alpha 7, sigma 35."""
  shape = (args.size,) * 3
  truncate = aug.code_truncate(35.0)
  scale = np.float32(7.0 * args.size / 2.0)

  def field(method, grid, key):
    return np.asarray(jax.jit(lambda k: ops.elastic_displacement(
        k, shape, scale, 35.0, truncate=truncate, method=method, grid=grid))(key))

  keys = [jax.random.key(args.seed + i) for i in range(3)]
  exact = [field("exact", 8, k) for k in keys]
  rms_exact = np.sqrt(np.mean([np.mean(e ** 2) for e in exact]))
  rows = []
  for grid in grids:
    coarse = [field("coarse", grid, k) for k in keys]
    err = np.concatenate([(c - e).ravel() for c, e in zip(coarse, exact, strict=True)])
    cov = [field("covariance", grid, k) for k in keys]
    rms_cov = np.sqrt(np.mean([np.mean(c ** 2) for c in cov]))
    rows.append({"grid_vox": grid, "coarse_rel_rms_err": np.sqrt(np.mean(err ** 2)) / rms_exact,
                 "coarse_max_err_vox": float(np.abs(err).max()),
                 "exact_max_vox": float(max(np.abs(e).max() for e in exact)),
                 "covariance_rms/exact_rms": rms_cov / rms_exact})
  return rows


def _filter_rows(args):
  """gaussian_filter formulations at size^3: seconds per call (3 axes)."""
  n = args.size
  x = jax.random.uniform(jax.random.key(args.seed), (n,) * 3)

  def conv(x, sigma):
    w = ops.gaussian_weights(sigma, ops.kernel_radius(sigma))
    r = w.shape[0] // 2
    y = x[None, ..., None]
    for axis in range(3):
      shape = [1, 1, 1]
      shape[axis] = w.shape[0]
      pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
      y = lax.conv_general_dilated(y, w.reshape(shape + [1, 1]), (1, 1, 1), pad,
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y[0, ..., 0]

  def fft(x, sigma):
    r = ops.kernel_radius(sigma)
    w = ops.gaussian_weights(sigma, r)
    size = n + 2 * r
    spectrum = jnp.fft.rfftn(x, s=(size,) * 3)
    for axis in range(3):
      kernel = jnp.fft.fft(jnp.roll(jnp.pad(w, (0, size - w.shape[0])), -r), size)
      kernel = kernel if axis < 2 else kernel[:size // 2 + 1]
      shape = [1, 1, 1]
      shape[axis] = kernel.shape[0]
      spectrum = spectrum * kernel.reshape(shape)
    return jnp.fft.irfftn(spectrum, s=(size,) * 3)[:n, :n, :n]

  rows = []
  for sigma in (0.7, 35.0):
    taps = 2 * ops.kernel_radius(sigma) + 1
    cands = {"shift": lambda x, s=sigma: ops.gaussian_filter(x, s, method="shift"),
             "matmul": lambda x, s=sigma: ops.gaussian_filter(x, s, method="matmul"),
             "fft": lambda x, s=sigma: fft(x, s)}
    if taps < 20:
      cands["lax.conv"] = lambda x, s=sigma: conv(x, s)
    ref = np.asarray(jax.jit(cands["matmul"])(x))
    for name, fn in cands.items():
      f = jax.jit(fn)
      reps = 1 if (name in ("shift", "lax.conv") and taps > 20) or name == "lax.conv" else 3
      med, _ = _timed(f, lambda r: (x,), reps)
      rows.append({"sigma": sigma, "taps": taps, "formulation": name, "seconds": med,
                   "max_diff_vs_matmul": float(np.abs(np.asarray(f(x)) - ref).max())})
  return rows


# --- montage ----------------------------------------------------------------

def _phantom(size, large, seed):
  """Normalised phantom volumes and lesion masks at ``large``^3 and ``size``^3."""
  from covid3d.data import phantom
  hu, mask, _ = phantom.make_scan(seed, kind="covid", severity=2, shape=(large,) * 3)
  vol_l = ((np.clip(hu, -1000.0, 500.0) + 1000.0) / 1500.0 - _MEAN) / _STD
  zoom = size / large
  vol = ndimage.zoom(vol_l, zoom, order=3)
  msk = ndimage.zoom(mask, zoom, order=0)
  return vol.astype(np.float32), msk, vol_l.astype(np.float32), mask


def _only(step, **fields):
  """A config with every step off except ``step`` (p = 1), plus ``fields`` for it."""
  c = aug.default_config()
  for name in ("crop", "flip", "rotate", "blur", "noise", "rot90", "elastic"):
    c[name].p = 0.0
  c[step].p = 1.0
  for k, v in fields.items():
    c[step][k] = v
  return c


def montage(args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  size = args.size
  large = args.large or round(size * 256 / 224)
  vol, msk, vol_l, msk_l = _phantom(size, large, args.seed)
  cases = [
      ("input (224 cache)" if size == 224 else "input", None),
      ("random crop from large cache", _only("crop")),
      ("flips (p 1 per axis)", _only("flip")),
      ("rotation, axial plane", _only("rotate")),
      ("Gaussian blur", _only("blur", sigma=(0.8, 0.8))),
      ("Gaussian noise", _only("noise", std=(1.0, 1.0))),
      ("90-degree reorientation", _only("rot90")),
      ("elastic, code units alpha 7", _only("elastic", alpha=(7.0, 7.0))),
      ("elastic, max 8 voxels", _only("elastic", units="max", max_displacement=(8.0, 8.0))),
      ("full pipeline (defaults)", aug.default_config()),
      ("full pipeline, elastic max 8 vox", None),
  ]
  full_max = aug.default_config()
  full_max.elastic.units = "max"
  cases[-1] = (cases[-1][0], full_max)
  key = jax.random.key(args.seed)
  # The sagittal plane through the column with the most lesion (a lung), not the midline
  # (the spine).
  lesion = np.asarray(msk).reshape(size, size, size).sum(axis=(0, 1))
  sagittal = int(np.argmax(lesion)) if lesion.any() else size // 4
  fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.6 * len(cases)))
  for row, (title, cfg) in enumerate(cases):
    if cfg is None:
      v, m = vol, msk
    else:
      # A key of this row whose draws apply something for the full pipeline.
      k = jax.random.fold_in(key, row)
      v, m = jax.jit(lambda k, c=cfg: aug.augment(k, vol, msk, c, volume_large=vol_l,
                                                  mask_large=msk_l))(k)
      v, m = np.asarray(v), np.asarray(m)
    views = [("axial", v[size // 2], m[size // 2]),
             ("coronal", v[:, size // 2, :], m[:, size // 2, :]),
             (f"sagittal (column {sagittal})", v[:, :, sagittal], m[:, :, sagittal])]
    for col, (name, img, lab) in enumerate(views):
      ax = axes[row, col]
      ax.imshow(img, cmap="gray", vmin=-1.3, vmax=1.9, origin="lower" if col else "upper")
      if lab.any():
        ax.contour(lab, levels=[0.5], colors="red", linewidths=0.6,
                   origin="lower" if col else "upper")
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(name, fontsize=9)
    axes[row, 0].set_ylabel(title, fontsize=8)
  fig.suptitle(f"covid3d.augment on the phantom ({size}^3, mid-slices; lesion mask in red)",
               fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.985))
  fig.savefig(args.montage, dpi=80)
  print(f"wrote {args.montage}")


def run(args):
  print(device_line())
  if args.montage:
    montage(args)
    return
  print(f"augmentation of one {args.size}^3 float32 volume (crop source "
        f"{args.large or round(args.size * 256 / 224)}^3), seconds per volume")
  print_table(_timing_rows(args))
  if args.stats:
    print(f"\nelastic displacement length at {args.size}^3, sigma 35 (exact field), voxels")
    print_table(_stats_rows(args))
    print("\ncoarse-grid fields vs the exact field (code units, alpha 7, sigma 35, 3 keys)")
    print_table(_error_rows(args))
  if args.filters:
    print(f"\ngaussian_filter formulations at {args.size}^3 (3 axes), seconds")
    print_table(_filter_rows(args))
