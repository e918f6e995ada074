"""Training augmentation on the accelerator: pure, jit-compiled, vmap-able.

The paper's (section 3.3) and the authors' code's augmentation of one CT
volume, driven by the ``augment`` block of a stage config
(:func:`default_config`). Building blocks live in :mod:`covid3d.augment_ops`
and are re-exported here: :func:`gaussian_filter`, :func:`warp`,
:func:`elastic_displacement`, :func:`rot90`.

Order of the steps (one example)::

  crop (256^3 cache -> random 224^3 crop, p) or the 224^3 cache
  one resampling for all geometric steps, in the code's order:
      flips (per axis) -> rotation (in a plane) -> quarter turns -> elastic
  Gaussian blur -> Gaussian noise -> optional clipping

The authors blur and add noise after the rotation and before the quarter turns
and the elastic step. Here the four geometric steps are composed into one
coordinate map and the volume is resampled once (one interpolation instead of
two or three), and blur and noise come after it: blurring commutes with flips,
quarter turns and rotations (an isotropic kernel), and noise added last is not
smoothed by the interpolation of the warps.

Batches: :func:`augment_batch` runs the examples one after the other
(``lax.map``), each skipping the steps it did not draw, and example i equals
``augment(jax.random.split(key, B)[i], ...)``. ``jax.vmap(augment)`` works too
but turns every ``lax.cond`` into a select that computes both branches, so it
is slower (docs/augment.md, "Benchmark"). All
examples of a batch share one shape; for a non-cubic shape the random quarter
turns keep the shape (only 0 or 180 degrees in a plane of two different
sizes), so outputs stack like inputs. :func:`rot90` with Python ints turns
any shape like ``np.rot90``.
"""
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from covid3d.augment_ops import (ELASTIC_METHODS, _QUARTER_PLANES, elastic_displacement,
                                 gaussian_filter, quarter_turns_matrix,
                                 rot90, rotation_matrix, sample, warp)

__all__ = ["default_config", "draw", "augment", "augment_batch", "augment_example",
           "resolve_noise_space",
           "gaussian_filter", "warp",
           "elastic_displacement", "rot90", "code_truncate"]

ELASTIC_UNITS = ("code", "voxels", "max")
BLUR_MODES = ("constant", "reflect", "mirror", "nearest", "wrap")
# Stream of each step's random draws: fold_in(key, id). Fixed, so turning one
# step off does not change the draws of the others.
_STREAM = {"crop": 0, "flip": 1, "rotate": 2, "blur": 3, "noise": 4, "rot90": 5,
           "elastic": 6}


def default_config() -> ml_collections.ConfigDict:
  """The ``augment`` block of a stage config: the paper's and the code's values.

  Fields (units; source). "code" is the authors' repository
  (KieDani/Submission_2nd_Covid19_Competition, training/config/dataconfig.py
  and training/data/data_api.py), "paper" is Kienzle et al. 2022, sect. 3.3.

  - ``order``: interpolation order of the volume in the one geometric
    resampling, 1 trilinear or 0 nearest (ours; the code uses order-3 splines
    for the rotation and nearest for the elastic step). Masks are always
    resampled nearest-neighbour.
  - ``crop.p``: probability of a random 224^3 crop from the 256^3 cache;
    otherwise the 224^3 cache (resized whole) is used (paper, code: 0.5).
  - ``flip.p``: probability of a flip, drawn for each axis on its own
    (code: 0.25; the paper names random flips along all three axes).
  - ``rotate.p``: probability of a rotation (code: 0.2).
  - ``rotate.max_degrees``: angle ~ U(-max, max), degrees (paper, code: 30).
  - ``rotate.plane``: the two axes of the rotation plane, of (0 D, 1 H, 2 W).
    Default (1, 2), the axial (row, column) plane: the paper's motivation,
    patients lying inclined to the side. The code rotates in (0, 1).
  - ``blur.p``: probability of a Gaussian blur (code: 0.2).
  - ``blur.sigma``: sigma ~ U(lo, hi), voxels (code: 0.6, 0.8; the paper calls
    0.6..0.8 the noise's standard deviation).
  - ``blur.truncate``: kernel half-width in sigmas (scipy default 4.0, as code).
  - ``blur.mode``: boundary mode (code: scipy's default 'reflect').
  - ``noise.p``: probability of Gaussian noise (code: 0.2).
  - ``noise.weight``: w in ``(1 - w) x + w N(mean, std)`` (code: 0.03).
  - ``noise.mean``: mean ~ U(lo, hi), intensity units (code: 0.5, 0.5).
  - ``noise.std``: std ~ U(lo, hi), intensity units (code: 0.3, 1.0).
  - ``noise.space``: where the noise is added. 'intensity' (default): to the
    [0, 1] volume, the units of ``mean``/``std`` (the code's pretraining).
    'input': to the normalised model input ``(x - m) / s`` (the code's
    fine-tuning), ``mean``/``std`` in those units; :func:`augment` works in
    intensity units, so a stage converts with :func:`resolve_noise_space`.
  - ``noise.skip_minimum``: leave voxels equal to the volume's minimum
    unchanged (code: True; air outside the body stays clean).
  - ``noise.clip``: None, or (lo, hi) to clip every output volume's
    intensities after the noise step (ours; off by default).
  - ``rot90.p``: probability of a random reorientation: a random multiple of
    90 degrees about each of the three axes (paper: 0.25; code: 0 in most
    submissions).
  - ``elastic.p``: probability of the elastic deformation (paper, code: 0.5).
  - ``elastic.units``: how the smoothed uniform(-1, 1) field becomes voxels:
    'code' (default): alpha times the field in the code's normalised
    [-1, 1] grid units, i.e. alpha * field * n / 2 voxels along an axis of n
    voxels; 'voxels': alpha * field voxels (the classic Simard/scipy recipe,
    the paper read literally); 'max': the field scaled so its largest
    displacement (vector length) is a drawn ``max_displacement``. With
    sigma 35, 'code' moves voxels by fractions of a voxel and 'voxels' by
    thousandths (docs/augment.md); 'max' gives a visible deformation.
  - ``elastic.alpha``: alpha ~ U(lo, hi) for 'code' and 'voxels' (paper,
    code: 1, 7; the code draws it once per batch, here per example).
  - ``elastic.max_displacement``: U(lo, hi) voxels for 'max' (ours: 2, 8).
  - ``elastic.sigma``: Gaussian smoothing of the field, voxels (paper, code: 35).
  - ``elastic.truncate``: kernel half-width in sigmas; None = the code's
    kernel, ``int(5 sigma) // 2`` taps each side (87 for sigma 35).
  - ``elastic.method``: 'exact', 'coarse' or 'covariance' (see
    :func:`elastic_displacement`; ours). Default 'covariance': it draws no
    full-resolution noise, so it is the fastest (docs/augment.md, "Benchmark").
  - ``elastic.grid``: knot spacing of 'coarse' and 'covariance', voxels
    (ours, 8; its interpolation error is in docs/augment.md).
  """
  c = ml_collections.ConfigDict()
  c.order = 1
  c.crop = ml_collections.ConfigDict({"p": 0.5})
  c.flip = ml_collections.ConfigDict({"p": 0.25})
  c.rotate = ml_collections.ConfigDict({"p": 0.2, "max_degrees": 30.0, "plane": (1, 2)})
  c.blur = ml_collections.ConfigDict({"p": 0.2, "sigma": (0.6, 0.8), "truncate": 4.0,
                                      "mode": "reflect"})
  c.noise = ml_collections.ConfigDict({"p": 0.2, "weight": 0.03, "mean": (0.5, 0.5),
                                       "std": (0.3, 1.0), "space": "intensity",
                                       "skip_minimum": True, "clip": None})
  c.rot90 = ml_collections.ConfigDict({"p": 0.25})
  c.elastic = ml_collections.ConfigDict({
      "p": 0.5, "units": "code", "alpha": (1.0, 7.0), "max_displacement": (2.0, 8.0),
      "sigma": 35.0, "truncate": None, "method": "covariance", "grid": 8})
  return c


def code_truncate(sigma: float) -> float:
  """``truncate`` that gives the code's kernel: ``int(5 sigma) // 2`` taps each side."""
  return (int(5 * sigma) // 2) / sigma


def _check_range(name, pair):
  if len(pair) != 2 or pair[0] > pair[1]:
    raise ValueError(f"augment config: {name} must be (lo, hi) with lo <= hi, got {pair}")


def _check(config) -> None:
  for step in ("crop", "flip", "rotate", "blur", "noise", "rot90", "elastic"):
    p = config[step].p
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"augment config: {step}.p = {p} is not in [0, 1]")
  if config.order not in (0, 1):
    raise ValueError(f"augment config: order = {config.order} is not 0 or 1")
  plane = tuple(config.rotate.plane)
  if len(plane) != 2 or len(set(plane)) != 2 or not set(plane) <= {0, 1, 2}:
    raise ValueError(f"augment config: rotate.plane = {plane} is not two of 0, 1, 2")
  if config.blur.mode not in BLUR_MODES:
    raise ValueError(f"augment config: blur.mode = {config.blur.mode!r} not in {BLUR_MODES}")
  e = config.elastic
  if e.units not in ELASTIC_UNITS:
    raise ValueError(f"augment config: elastic.units = {e.units!r} not in {ELASTIC_UNITS}")
  if e.method not in ELASTIC_METHODS:
    raise ValueError(f"augment config: elastic.method = {e.method!r} not in {ELASTIC_METHODS}")
  for name, pair in (("blur.sigma", config.blur.sigma), ("noise.mean", config.noise.mean),
                     ("noise.std", config.noise.std), ("elastic.alpha", e.alpha),
                     ("elastic.max_displacement", e.max_displacement)):
    _check_range(name, pair)
  if config.noise.clip is not None:
    _check_range("noise.clip", config.noise.clip)
  if config.noise.space != "intensity":
    raise ValueError(f"augment.noise.space={config.noise.space!r}: augment works in intensity "
                     "units; convert the config with resolve_noise_space(config, mean, std)")


def _uniform(key, pair):
  return jax.random.uniform(key, (), jnp.float32, pair[0], pair[1])


def _quarter_turn_choices(shape) -> np.ndarray:
  """Per axis, the turn counts that keep ``shape``: all four, or 0 and 2."""
  return np.array([[0, 1, 2, 3] if shape[b] == shape[c] else [0, 2, 0, 2]
                   for b, c in _QUARTER_PLANES], np.int32)


def draw(key: jax.Array, config: ml_collections.ConfigDict, shape: Tuple[int, int, int],
         large_shape: Optional[Tuple[int, int, int]] = None) -> dict:
  """All random choices of one example's augmentation.

  Args:
    key: ``jax.random`` key of the example.
    config: the ``augment`` block.
    shape: static output shape ``(D, H, W)``.
    large_shape: static shape of the crop source (the 256^3 cache), or None.

  Returns:
    dict of scalars/arrays: bools ``crop``, ``flip`` (3,), ``rotate``,
    ``rot90``, ``blur``, ``noise``, ``elastic`` (whether each step applies) and
    their parameters ``offset`` (3,) int32, ``angle`` (degrees), ``ks`` (3,)
    int32, ``blur_sigma``, ``noise_mean``, ``noise_std``, ``noise_key``,
    ``elastic_alpha``, ``elastic_max`` and ``elastic_key``.
  """
  keys = {name: jax.random.split(jax.random.fold_in(key, i), 3)
          for name, i in _STREAM.items()}
  c = config
  out = {}
  out["crop"] = jax.random.bernoulli(keys["crop"][0], c.crop.p)
  if large_shape is None:
    out["offset"] = jnp.zeros(3, jnp.int32)
  else:
    span = jnp.asarray(np.subtract(large_shape, shape) + 1, jnp.int32)
    out["offset"] = jax.random.randint(keys["crop"][1], (3,), 0, span)
  out["flip"] = jax.random.bernoulli(keys["flip"][0], c.flip.p, (3,))
  out["rotate"] = jax.random.bernoulli(keys["rotate"][0], c.rotate.p)
  out["angle"] = _uniform(keys["rotate"][1], (-c.rotate.max_degrees, c.rotate.max_degrees))
  out["rot90"] = jax.random.bernoulli(keys["rot90"][0], c.rot90.p)
  choice = jax.random.randint(keys["rot90"][1], (3,), 0, 4)
  out["ks"] = jnp.asarray(_quarter_turn_choices(shape))[jnp.arange(3), choice]
  out["blur"] = jax.random.bernoulli(keys["blur"][0], c.blur.p)
  out["blur_sigma"] = _uniform(keys["blur"][1], c.blur.sigma)
  out["noise"] = jax.random.bernoulli(keys["noise"][0], c.noise.p)
  out["noise_mean"] = _uniform(keys["noise"][1], c.noise.mean)
  out["noise_std"] = _uniform(jax.random.fold_in(keys["noise"][1], 1), c.noise.std)
  out["noise_key"] = keys["noise"][2]
  out["elastic"] = jax.random.bernoulli(keys["elastic"][0], c.elastic.p)
  out["elastic_alpha"] = _uniform(keys["elastic"][1], c.elastic.alpha)
  out["elastic_max"] = _uniform(jax.random.fold_in(keys["elastic"][1], 1),
                                c.elastic.max_displacement)
  out["elastic_key"] = keys["elastic"][2]
  return out


def elastic_field(key: jax.Array, alpha, max_displacement, shape, config) -> jax.Array:
  """One example's elastic displacement ``(3, D, H, W)`` in voxels, per ``config.elastic``.

  Args:
    key: ``jax.random`` key of the field.
    alpha: scale for units 'code' and 'voxels' (ignored for 'max').
    max_displacement: largest displacement length in voxels for units 'max'.
    shape: static ``(D, H, W)``.
    config: the ``augment`` block.
  """
  e = config.elastic
  truncate = code_truncate(e.sigma) if e.truncate is None else e.truncate
  if e.units == "code":
    scale = alpha * jnp.asarray(shape, jnp.float32) / 2.0
  elif e.units == "voxels":
    scale = alpha
  else:
    scale = 1.0
  d = elastic_displacement(key, shape, scale, e.sigma, truncate=truncate, method=e.method,
                           grid=e.grid)
  if e.units == "max":
    longest = jnp.sqrt(jnp.max(jnp.sum(d * d, axis=0)))
    d = d * (max_displacement / jnp.maximum(longest, 1e-12))
  return d


def _geometry_matrix(p, plane) -> jax.Array:
  """Centred sampling matrix of flips -> rotation -> quarter turns (3 x 3 float32)."""
  flips = jnp.diag(jnp.where(p["flip"], -1.0, 1.0))
  rot = rotation_matrix(jnp.where(p["rotate"], p["angle"], 0.0), plane)
  quarter = jnp.where(p["rot90"], quarter_turns_matrix(p["ks"]), jnp.eye(3, dtype=jnp.int32))
  return flips @ rot @ quarter.astype(jnp.float32)


def _check_inputs(shape, mask, config, volume_large, mask_large):
  if len(shape) != 3:
    raise ValueError(f"augment: volume must be (D, H, W), got {shape}")
  if mask is not None and tuple(mask.shape) != shape:
    raise ValueError(f"augment: mask {tuple(mask.shape)} != volume {shape}")
  if config.crop.p == 0:
    return None
  if volume_large is None:
    raise ValueError(f"augment: crop.p = {config.crop.p} needs volume_large (the larger "
                     "cache, e.g. 256^3); pass it or set crop.p = 0")
  large_shape = tuple(volume_large.shape)
  if len(large_shape) != 3 or any(l < s for l, s in zip(large_shape, shape, strict=True)):
    raise ValueError(f"augment: volume_large {large_shape} is not a volume at least as "
                     f"large as volume {shape}")
  if (mask is None) != (mask_large is None):
    raise ValueError("augment: give mask_large exactly when mask is given")
  if mask_large is not None and tuple(mask_large.shape) != large_shape:
    raise ValueError(f"augment: mask_large {tuple(mask_large.shape)} != volume_large "
                     f"{large_shape}")
  return large_shape


def augment(key: jax.Array, volume: jax.Array, mask: Optional[jax.Array],
            config: ml_collections.ConfigDict, *, volume_large: Optional[jax.Array] = None,
            mask_large: Optional[jax.Array] = None):
  """The whole training augmentation of one example.

  Works under ``jax.jit`` and ``jax.vmap``; ``config`` is static (close over
  it, or pass a ``FrozenConfigDict`` as a static argument). Each step runs
  under ``lax.cond``: skipped when not drawn, except under ``vmap``, where
  both branches run (use :func:`augment_batch` for batches).

  Args:
    key: ``jax.random`` key; every random choice derives from it (:func:`draw`).
    volume: float32 ``(D, H, W)``, the 224^3 cache (the whole scan resized).
    mask: integer ``(D, H, W)`` labels (uint8/int32), or None.
    config: the ``augment`` block (:func:`default_config`).
    volume_large: float32, the larger cache (256^3) to crop ``volume``'s shape
      from; needed when ``config.crop.p > 0``.
    mask_large: the labels of ``volume_large``; needed when ``mask`` is given
      and ``volume_large`` is.

  Returns:
    ``(volume, mask)``: float32 ``(D, H, W)`` and the mask of its input dtype
    (None when ``mask`` is None), transformed by the same geometry (the mask
    nearest-neighbour, so it keeps its label set).
  """
  _check(config)
  shape = tuple(volume.shape)
  large_shape = _check_inputs(shape, mask, config, volume_large, mask_large)
  p = draw(key, config, shape, large_shape)
  images = (jnp.asarray(volume, jnp.float32), mask)

  if large_shape is not None:
    def crop(_):
      cut = lambda x: lax.dynamic_slice(x, p["offset"], shape)  # noqa: E731
      return (cut(jnp.asarray(volume_large, jnp.float32)),
              None if mask is None else cut(mask_large))
    images = lax.cond(p["crop"], crop, lambda x: x, images)

  def resample(images):
    disp = jnp.zeros((3,) + shape, jnp.float32)
    if config.elastic.p > 0:
      disp = lax.cond(p["elastic"], lambda: elastic_field(
          p["elastic_key"], p["elastic_alpha"], p["elastic_max"], shape, config),
          lambda: disp)
    matrix = _geometry_matrix(p, tuple(config.rotate.plane))
    centre = (np.asarray(shape) - 1) / 2.0
    # Centred output coordinates as broadcast 1-D ramps: no full grid in memory.
    ramps = [(jnp.arange(n, dtype=jnp.float32) - c).reshape([-1 if a == i else 1
                                                              for a in range(3)])
             for i, (n, c) in enumerate(zip(shape, centre, strict=True))]
    coords = jnp.stack([
        sum(matrix[i, j] * (ramps[j] + disp[j]) for j in range(3)) + centre[i]
        for i in range(3)])
    vol, msk = images
    if msk is None:
      return sample(vol, coords, config.order), None
    return sample(vol, coords, config.order, labels=msk)

  geometric = jnp.any(p["flip"]) | p["rotate"] | p["rot90"] | p["elastic"]
  vol, msk = lax.cond(geometric, resample, lambda x: x, images)

  b = config.blur
  if b.p > 0:
    vol = lax.cond(p["blur"], lambda v: gaussian_filter(
        v, p["blur_sigma"], b.truncate, mode=b.mode, max_sigma=b.sigma[1]), lambda v: v, vol)

  n = config.noise
  if n.p > 0:
    def add_noise(v):
      gauss = p["noise_mean"] + p["noise_std"] * jax.random.normal(p["noise_key"], shape)
      noisy = (1.0 - n.weight) * v + n.weight * gauss
      return jnp.where(v == jnp.min(v), v, noisy) if n.skip_minimum else noisy
    vol = lax.cond(p["noise"], add_noise, lambda v: v, vol)
  if n.clip is not None:
    vol = jnp.clip(vol, n.clip[0], n.clip[1])
  return vol, msk


def resolve_noise_space(config: ml_collections.ConfigDict, mean: float,
                        std: float) -> ml_collections.ConfigDict:
  """``config`` with its noise in intensity units, for data normalised as ``(x - mean) / std``.

  Noise ``(1 - w) y + w N(mu, sigma)`` added to the model input ``y = (x - mean) / std``
  equals ``(1 - w) x + w N(mean + std mu, std sigma)`` added to ``x`` before the
  normalisation (the skipped minimum voxels are the same ones), so
  ``noise.space='input'`` becomes 'intensity' with ``mean + std * noise.mean``
  and ``std * noise.std``. A config already in intensity units is returned as it is.
  """
  if config.noise.space == "intensity":
    return config
  if config.noise.space != "input":
    raise ValueError(f"augment.noise.space must be 'input' or 'intensity', "
                     f"got {config.noise.space!r}")
  out = ml_collections.ConfigDict(config.to_dict())
  out.noise.mean = tuple(mean + std * m for m in config.noise.mean)
  out.noise.std = tuple(std * s for s in config.noise.std)
  out.noise.space = "intensity"
  return out


def augment_example(key: jax.Array, example: dict, config: ml_collections.ConfigDict) -> dict:
  """:func:`augment` of one example of a training batch: the train step's ``augment_fn``.

  ``example["image"]`` ``(D, H, W, 1)`` float32 and, when present,
  ``example["mask"]`` ``(D, H, W, 1)`` are transformed together;
  ``image_large``/``mask_large`` (the crop source, same layout) are consumed
  and dropped; every other entry passes through unchanged.
  """
  channel = lambda name: example[name][..., 0] if name in example else None  # noqa: E731
  volume, mask = augment(key, channel("image"), channel("mask"), config,
                         volume_large=channel("image_large"), mask_large=channel("mask_large"))
  out = {k: v for k, v in example.items() if not k.endswith("_large")}
  out["image"] = volume[..., None]
  if mask is not None:
    out["mask"] = mask[..., None]
  return out


def augment_batch(key: jax.Array, volumes: jax.Array, masks: Optional[jax.Array],
                  config: ml_collections.ConfigDict, *,
                  volumes_large: Optional[jax.Array] = None,
                  masks_large: Optional[jax.Array] = None):
  """:func:`augment` of a batch ``(B, D, H, W)``; example i uses ``split(key, B)[i]``.

  The examples run one after the other (``lax.map``), so each skips the steps
  it did not draw; ``jax.vmap(augment)`` computes every step for every example
  and is slower. Arguments and results are :func:`augment`'s with a leading
  batch axis.
  """
  keys = jax.random.split(key, volumes.shape[0])

  def one(args):
    k, v, m, vl, ml = args
    return augment(k, v, m, config, volume_large=vl, mask_large=ml)

  return lax.map(one, (keys, volumes, masks, volumes_large, masks_large))
