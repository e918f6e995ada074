"""Tests of covid3d.augment against scipy/numpy references (small volumes)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from covid3d import augment as aug
from covid3d import augment_ops as ops

STEPS = ("crop", "flip", "rotate", "blur", "noise", "rot90", "elastic")


def _rand(shape, seed=0):
  return np.random.default_rng(seed).random(shape, np.float32)


def _grid(shape):
  return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)


def _only(step, **fields):
  c = aug.default_config()
  for name in STEPS:
    c[name].p = 0.0
  c[step].p = 1.0
  for k, v in fields.items():
    c[step][k] = v
  return c


def _np_rot90(x, ks):
  for axis, k in enumerate(ks):
    x = np.rot90(x, int(k), axes=ops._QUARTER_PLANES[axis])
  return x


# --- gaussian_filter --------------------------------------------------------

@pytest.mark.parametrize("sigma,truncate", [(0.7, 4.0), (2.0, 4.0), (3.5, 2.5),
                                            ((1.0, 0.5, 3.0), 4.0), (9.0, 4.0)])
@pytest.mark.parametrize("method", ["shift", "matmul", "auto"])
def test_gaussian_filter_matches_scipy_constant(sigma, truncate, method):
  x = _rand((12, 16, 20))
  want = ndimage.gaussian_filter(x, sigma, mode="constant", truncate=truncate)
  got = ops.gaussian_filter(x, sigma, truncate, method=method)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror", "wrap"])
@pytest.mark.parametrize("method", ["shift", "matmul"])
def test_gaussian_filter_matches_scipy_modes(mode, method):
  x = _rand((10, 14, 18), seed=1)
  want = ndimage.gaussian_filter(x, 1.6, mode=mode)
  got = aug.gaussian_filter(x, 1.6, mode=mode, method=method)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_gaussian_filter_traced_sigma_matches_scipy():
  x = _rand((12, 12, 16), seed=2)
  f = jax.jit(lambda x, s: aug.gaussian_filter(x, s, mode="reflect", max_sigma=0.8))
  for sigma in (0.6, 0.62, 0.7, 0.8):  # radius 2 up to 0.62, 3 from 0.63 on
    np.testing.assert_allclose(np.asarray(f(x, sigma)),
                               ndimage.gaussian_filter(x, sigma, mode="reflect"), atol=2e-6)


def test_gaussian_filter_bad_arguments():
  x = jnp.zeros((4, 4, 4))
  with pytest.raises(ValueError, match="max_sigma"):
    jax.jit(lambda s: aug.gaussian_filter(x, s))(1.0)
  with pytest.raises(ValueError, match="mode"):
    aug.gaussian_filter(x, 1.0, mode="edge")
  with pytest.raises(ValueError, match="sigma"):
    aug.gaussian_filter(x, (1.0, 2.0))


# --- warp, rot90 ------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("shape", [(16, 16, 16), (10, 17, 23)])
def test_warp_matches_map_coordinates(order, shape):
  x = _rand(shape, seed=3)
  d = np.random.default_rng(4).normal(0, 4, (3,) + shape).astype(np.float32)  # leaves the box
  want = ndimage.map_coordinates(x, _grid(shape) + d, order=order, mode="nearest")
  np.testing.assert_allclose(np.asarray(aug.warp(x, d, order)), want, atol=2e-6)


def test_warp_labels_order0_keeps_dtype_and_values():
  labels = np.random.default_rng(5).choice(np.array([0, 2, 7], np.uint8), (12, 12, 12))
  d = np.random.default_rng(6).normal(0, 3, (3, 12, 12, 12)).astype(np.float32)
  got = np.asarray(aug.warp(labels, d, order=0))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(
      got, ndimage.map_coordinates(labels, _grid(labels.shape) + d, order=0, mode="nearest"))


def test_warp_rejects_bad_displacement():
  with pytest.raises(ValueError, match="displacement"):
    aug.warp(jnp.zeros((4, 4, 4)), jnp.zeros((3, 4, 4, 5)))


@pytest.mark.parametrize("shape", [(6, 6, 6), (4, 6, 9)])
def test_rot90_static_matches_numpy(shape):
  x = _rand(shape, seed=7)
  for ks in itertools.product(range(4), repeat=3):
    want = _np_rot90(x, ks)
    got = aug.rot90(x, ks)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), want)


def test_rot90_traced_matches_numpy_on_cubes():
  x = _rand((7, 7, 7), seed=8)
  f = jax.jit(aug.rot90)
  for ks in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 2, 3), (3, 3, 1), (2, 1, 0)]:
    np.testing.assert_array_equal(np.asarray(f(x, jnp.asarray(ks))), _np_rot90(x, ks))
  with pytest.raises(ValueError, match="cubic"):
    f(jnp.zeros((4, 4, 5)), jnp.asarray((1, 0, 0)))


# --- elastic displacement ---------------------------------------------------

def test_elastic_exact_is_scipy_smoothed_uniform_noise():
  key, shape = jax.random.key(11), (12, 14, 16)
  got = np.asarray(aug.elastic_displacement(key, shape, (2.0, 3.0, 4.0), 3.0, method="exact"))
  noise = np.asarray(jax.random.uniform(key, (3,) + shape, jnp.float32, -1.0, 1.0))
  for axis, alpha in enumerate((2.0, 3.0, 4.0)):
    want = alpha * ndimage.gaussian_filter(noise[axis], 3.0, mode="constant")
    np.testing.assert_allclose(got[axis], want, atol=1e-6)


def test_elastic_coarse_equals_exact_at_knots_and_is_close_between():
  key, shape, grid = jax.random.key(12), (17, 20, 24), 4
  exact = np.asarray(aug.elastic_displacement(key, shape, 1.0, 6.0, method="exact"))
  coarse = np.asarray(aug.elastic_displacement(key, shape, 1.0, 6.0, method="coarse",
                                               grid=grid))
  knots = [ops.coarse_knots(n, grid) for n in shape]
  assert all(np.diff(k).max() <= grid and k[0] == 0 and k[-1] == n - 1
             for k, n in zip(knots, shape, strict=True))
  at = np.ix_(range(3), *knots)
  np.testing.assert_allclose(coarse[at], exact[at], atol=1e-6)
  rel = np.linalg.norm(coarse - exact) / np.linalg.norm(exact)
  assert rel < 0.1  # grid / sigma = 0.67 here; docs/augment.md has the 224^3 figure


def test_elastic_covariance_has_the_coarse_fields_variance():
  shape, sigma = (9, 9, 9), 2.0
  keys = jax.random.split(jax.random.key(13), 200)

  def var(method):
    f = jax.jit(jax.vmap(lambda k: aug.elastic_displacement(k, shape, 1.0, sigma,
                                                            method=method, grid=4)))
    return np.var(np.asarray(f(keys)), axis=0).mean()

  # 200 draws of a field with ~ (9 / 2)^3 correlation cells: a few % spread.
  np.testing.assert_allclose(var("covariance"), var("coarse"), rtol=0.1)


def _np_filter_matrix(n, sigma, radius):
  """``S`` with ``(S @ u)[i] = sum_o w[o] u[i + o]``: normalised Gaussian taps at
  offsets ``-radius..radius``, zeros outside the volume (no renormalisation)."""
  w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  w /= w.sum()
  return sum(w[o + radius] * np.eye(n, k=o) for o in range(-radius, radius + 1))


def _np_corr(cov):
  sd = np.sqrt(np.diag(cov))
  return cov / sd[:, None] / sd[None, :]


def test_default_elastic_field_has_the_exact_smoothed_noise_covariance():
  """The default field ('covariance' method, knots every <= grid voxels) against
  the covariance of uniform(-1, 1) noise (variance 1/3) smoothed by the code's
  kernel (``int(5 sigma) // 2`` taps each side, zeros outside): per axis
  ``C = S S^T``, field covariance ``(1/3) C_0 (x) C_1 (x) C_2``. At the knots the
  draws must have exactly that covariance; between knots its piecewise-linear
  interpolation ``U C[knots, knots] U^T``."""
  shape, sigma, n_fields, batch = (24, 20, 17), 3.0, 16000, 2000
  cfg = aug.default_config()
  assert cfg.elastic.method == "covariance" and cfg.elastic.truncate is None
  cfg.elastic.sigma, cfg.elastic.units = sigma, "voxels"
  grid = cfg.elastic.grid
  radius = int(5 * sigma) // 2  # docs/augment.md: the code's kernel, 7 taps each side
  knots = [ops.coarse_knots(n, grid) for n in shape]
  for k, n in zip(knots, shape, strict=True):
    assert k[0] == 0 and k[-1] == n - 1 and 2 < len(k) < n and np.diff(k).max() <= grid

  exact, model = [], []  # per axis: exact filter covariance; knot-interpolated one
  for n, k in zip(shape, knots, strict=True):
    s = _np_filter_matrix(n, sigma, radius)
    c = s @ s.T
    u = np.stack([np.interp(np.arange(n), k, e) for e in np.eye(len(k))], axis=1)
    exact.append(c)
    model.append(u @ c[np.ix_(k, k)] @ u.T)
  sd = np.sqrt((1 / 3) * np.einsum("i,j,k->ijk", *[np.diag(m) for m in model]))
  corr = [_np_corr(m) for m in model]

  # g = field / its model standard deviation. Per axis, the sum over fields and
  # components of g_p g_q for every pair (p, q) along it, the other two axes
  # at their knots (knot-to-knot pairs are then the exact claim; the rest test
  # the interpolation); and the sums of g_a g_b over all voxels, a < b.
  def at_other_knots(g, axis):
    for j in range(3):
      if j != axis:
        g = jnp.take(g, knots[j], axis=j + 2)
    return g

  @jax.jit
  def moments(keys):
    g = jax.vmap(lambda k: aug.elastic_field(k, 1.0, 0.0, shape, cfg))(keys) / sd
    hi = jax.lax.Precision.HIGHEST
    second = [jnp.einsum(eq, at_other_knots(g, a), at_other_knots(g, a), precision=hi)
              for a, eq in enumerate(("ncijk,ncljk->il", "ncjik,ncjlk->il",
                                      "ncjki,ncjkl->il"))]
    cross = jnp.stack([jnp.sum(g[:, a] * g[:, b]) for a, b in ((0, 1), (0, 2), (1, 2))])
    return second, cross

  keys = jax.random.split(jax.random.key(15), n_fields)
  second = [np.zeros((n, n)) for n in shape]
  cross = np.zeros(3)
  for start in range(0, n_fields, batch):
    s, c = moments(keys[start:start + batch])
    second = [a + np.asarray(b, np.float64) for a, b in zip(second, s, strict=True)]
    cross += np.asarray(c, np.float64)

  worst = 0.0
  for axis, _n in enumerate(shape):
    other = [corr[j][np.ix_(knots[j], knots[j])] for j in range(3) if j != axis]
    m = other[0].shape[0] * other[1].shape[0]
    emp = second[axis] / (3 * n_fields * m)  # normalised covariance along the axis
    # Standard error of that pooled mean over 3 independent components x
    # n_fields fields x m positions (Isserlis, separable covariance):
    # sqrt((1 + rho^2) ||R_other||_F^2 / (m^2 3 N)).
    other_fro2 = np.sum(other[0] ** 2) * np.sum(other[1] ** 2)
    se = np.sqrt((1 + corr[axis] ** 2) * other_fro2 / (m ** 2 * 3 * n_fields))
    k = knots[axis]
    at_knots = np.ix_(k, k)
    # The claim: on the knot lattice, the variance (1/3) prod_d C_d[i, i] and the
    # correlation of the exact filter.
    np.testing.assert_array_less(np.abs(np.diag(emp)[k] - 1), 5 * np.diag(se)[k],
                                 err_msg=f"axis {axis}: variance at the knots")
    np.testing.assert_array_less(np.abs(emp[at_knots] - _np_corr(exact[axis])[at_knots]),
                                 5 * se[at_knots], err_msg=f"axis {axis}: knot correlation")
    # Every pair of voxels along the axis (all lags): the knots' interpolation.
    np.testing.assert_array_less(np.abs(emp - corr[axis]), 5 * se,
                                 err_msg=f"axis {axis}: correlation between knots")
    worst = max(worst, np.max(np.abs(emp - corr[axis]) / se))
  print(f"largest deviation {worst:.2f} standard errors")
  # The three components are independent (same pooling over all voxels).
  n_vox = int(np.prod(shape))
  se_cross = np.sqrt(np.prod([np.sum(r ** 2) for r in corr]) / (n_vox ** 2 * n_fields))
  np.testing.assert_array_less(np.abs(cross / (n_fields * n_vox)), 5 * se_cross)


def test_elastic_field_units():
  key, shape = jax.random.key(14), (10, 12, 16)
  unit = np.asarray(aug.elastic_displacement(key, shape, 1.0, 35.0,
                                             truncate=aug.code_truncate(35.0), method="exact"))
  cfg = aug.default_config()
  cfg.elastic.method = "exact"
  code = np.asarray(aug.elastic_field(key, 3.0, 0.0, shape, cfg))
  np.testing.assert_allclose(code, unit * 3.0 * np.asarray(shape)[:, None, None, None] / 2,
                             rtol=1e-5, atol=1e-9)
  cfg.elastic.units = "max"
  scaled = np.asarray(aug.elastic_field(key, 3.0, 5.0, shape, cfg))
  np.testing.assert_allclose(np.sqrt((scaled ** 2).sum(0)).max(), 5.0, rtol=1e-5)
  np.testing.assert_allclose(scaled / np.abs(scaled).max(), unit / np.abs(unit).max(),
                             atol=1e-5)
  assert aug.code_truncate(35.0) * 35.0 == pytest.approx(87.0)


# --- the pipeline, one step at a time ----------------------------------------

def _jitted(cfg):
  """``augment`` under ``config`` as a jitted function of (key, vol, mask, vol_l, mask_l)."""
  return jax.jit(lambda key, vol, mask=None, vol_l=None, mask_l=None: aug.augment(
      key, vol, mask, cfg, volume_large=vol_l, mask_large=mask_l))


def _run(cfg, key, vol, mask=None, vol_l=None, mask_l=None):
  return _jitted(cfg)(key, vol, mask, vol_l, mask_l)


def test_crop_takes_the_drawn_window_of_the_large_cache():
  vol, vol_l = _rand((8, 8, 8)), _rand((12, 11, 10), seed=1)
  mask_l = (vol_l > 0.5).astype(np.uint8)
  cfg = _only("crop")
  key = jax.random.key(0)
  p = aug.draw(key, cfg, vol.shape, vol_l.shape)
  o = np.asarray(p["offset"])
  assert bool(p["crop"]) and np.all(o >= 0) and np.all(o <= np.subtract(vol_l.shape, 8))
  v, m = _run(cfg, key, vol, np.zeros((8, 8, 8), np.uint8), vol_l, mask_l)
  window = tuple(slice(a, a + 8) for a in o)
  np.testing.assert_array_equal(np.asarray(v), vol_l[window])
  np.testing.assert_array_equal(np.asarray(m), mask_l[window])
  cfg.crop.p = 0.0
  np.testing.assert_array_equal(np.asarray(_run(cfg, key, vol)[0]), vol)


def test_crop_needs_the_large_cache():
  with pytest.raises(ValueError, match="volume_large"):
    aug.augment(jax.random.key(0), jnp.zeros((8, 8, 8)), None, aug.default_config())


def test_flips_follow_the_draws():
  vol = _rand((6, 7, 8))
  cfg = _only("flip", p=0.5)
  run = _jitted(cfg)
  seen = set()
  for i in range(12):
    key = jax.random.key(i)
    flips = np.asarray(aug.draw(key, cfg, vol.shape)["flip"])
    seen.add(tuple(flips))
    want = np.flip(vol, tuple(np.flatnonzero(flips))) if flips.any() else vol
    np.testing.assert_array_equal(np.asarray(run(key, vol)[0]), want)
  assert len(seen) > 3


@pytest.mark.parametrize("plane", [(1, 2), (0, 1)])
def test_rotation_matches_scipy_rotate(plane):
  vol = _rand((9, 12, 14), seed=2)
  cfg = _only("rotate", plane=plane)
  key = jax.random.key(3)
  angle = float(aug.draw(key, cfg, vol.shape)["angle"])
  assert 0 < abs(angle) < 30
  want = ndimage.rotate(vol, angle, axes=plane, reshape=False, order=1, mode="nearest")
  np.testing.assert_allclose(np.asarray(_run(cfg, key, vol)[0]), want, atol=1e-5)


def test_rot90_step_matches_numpy_and_keeps_non_cubic_shapes():
  cube = _rand((6, 6, 6), seed=4)
  cfg = _only("rot90")
  run = _jitted(cfg)
  for i in range(4):
    key = jax.random.key(i)
    ks = np.asarray(aug.draw(key, cfg, cube.shape)["ks"])
    np.testing.assert_array_equal(np.asarray(run(key, cube)[0]), _np_rot90(cube, ks))
  box = _rand((6, 6, 9), seed=5)  # only the (0, 1) plane (about axis 2) has equal sizes
  ks_all = np.asarray(jax.vmap(lambda k: aug.draw(k, cfg, box.shape)["ks"])(
      jax.random.split(jax.random.key(0), 400)))
  assert set(ks_all[:, 0]) == {0, 2} and set(ks_all[:, 1]) == {0, 2}
  assert set(ks_all[:, 2]) == {0, 1, 2, 3}
  key = jax.random.key(next(i for i in range(400) if ks_all[i, 2] % 2))
  ks = np.asarray(aug.draw(key, cfg, box.shape)["ks"])
  assert ks[2] % 2 == 1
  got = np.asarray(_run(cfg, key, box)[0])
  np.testing.assert_array_equal(got, _np_rot90(box, ks))


def test_blur_step_matches_scipy_with_the_drawn_sigma():
  vol = _rand((10, 10, 12), seed=6)
  cfg = _only("blur")
  key = jax.random.key(5)
  sigma = float(aug.draw(key, cfg, vol.shape)["blur_sigma"])
  assert 0.6 <= sigma <= 0.8
  np.testing.assert_allclose(np.asarray(_run(cfg, key, vol)[0]),
                             ndimage.gaussian_filter(vol, sigma, mode="reflect"), atol=2e-6)


def test_noise_step_spares_the_minimum_and_has_the_drawn_moments():
  vol = _rand((24, 24, 24), seed=7)
  vol[:4] = -2.0  # "air": the minimum
  cfg = _only("noise", clip=(-1.5, 1.5))
  key = jax.random.key(6)
  p = aug.draw(key, cfg, vol.shape)
  out = np.asarray(_run(cfg, key, vol)[0])
  np.testing.assert_array_equal(out[:4], -1.5)  # the minimum kept, then clipped
  implied = (out[4:] - 0.97 * vol[4:]) / 0.03
  assert abs(implied.mean() - float(p["noise_mean"])) < 0.05
  assert abs(implied.std() - float(p["noise_std"])) < 0.05
  assert out.min() >= -1.5 and out.max() <= 1.5


def test_elastic_step_is_warp_by_the_drawn_field():
  vol = _rand((12, 12, 12), seed=8)
  cfg = _only("elastic", units="max")
  key = jax.random.key(7)
  p = aug.draw(key, cfg, vol.shape)
  d = aug.elastic_field(p["elastic_key"], p["elastic_alpha"], p["elastic_max"], vol.shape, cfg)
  np.testing.assert_allclose(np.asarray(_run(cfg, key, vol)[0]),
                             np.asarray(aug.warp(vol, d, 1)), atol=1e-5)


# --- the whole pipeline -------------------------------------------------------

def test_draw_probabilities_and_ranges():
  cfg = aug.default_config()
  cfg.rot90.p = 0.4
  n = 4000
  p = jax.jit(jax.vmap(lambda k: aug.draw(k, cfg, (8, 8, 8), (10, 10, 10))))(
      jax.random.split(jax.random.key(0), n))
  for step in STEPS:  # binomial std <= 0.008: 0.035 is > 4 std
    assert abs(np.asarray(p[step]).mean() - cfg[step].p) < 0.035, step
  assert np.all(np.abs(np.asarray(p["angle"])) <= 30) and np.asarray(p["angle"]).std() > 15
  assert set(np.unique(np.asarray(p["ks"]))) == {0, 1, 2, 3}
  assert set(np.unique(np.asarray(p["offset"]))) == {0, 1, 2}
  for name, (lo, hi) in (("blur_sigma", cfg.blur.sigma), ("noise_std", cfg.noise.std),
                         ("elastic_alpha", cfg.elastic.alpha)):
    v = np.asarray(p[name])
    assert v.min() >= lo and v.max() <= hi and v.max() - v.min() > 0.9 * (hi - lo), name


def _example(size=16, large=20, seed=9):
  rng = np.random.default_rng(seed)
  vol_l = rng.random((large,) * 3, np.float32)
  mask_l = rng.choice(np.array([0, 1, 3], np.uint8), (large,) * 3)
  return vol_l[:size, :size, :size].copy(), mask_l[:size, :size, :size].copy(), vol_l, mask_l


def _full_config():
  cfg = aug.default_config()
  for step in STEPS:
    cfg[step].p = 0.7
  cfg.elastic.units = "max"
  return cfg


def test_mask_geometry_and_batch_vmap_single_agree():
  """One config, compiled three ways: vmap, augment_batch and a single example."""
  vol, mask, vol_l, mask_l = _example()
  cfg = _full_config()
  cfg.order = 0  # nearest for the volume too: a volume equal to the mask must stay equal
  cfg.blur.p = cfg.noise.p = 0.0
  b = 6
  vols = np.stack([mask.astype(np.float32)] * b)
  masks = np.stack([mask] * b)
  vols_l, masks_l = np.stack([mask_l.astype(np.float32)] * b), np.stack([mask_l] * b)
  key = jax.random.key(3)
  keys = jax.random.split(key, b)
  vmapped = jax.jit(jax.vmap(lambda k, v, m, vl, ml: aug.augment(
      k, v, m, cfg, volume_large=vl, mask_large=ml)))(keys, vols, masks, vols_l, masks_l)
  assert vmapped[1].dtype == np.uint8
  assert set(np.unique(np.asarray(vmapped[1]))) <= {0, 1, 3}
  np.testing.assert_array_equal(np.asarray(vmapped[0]), np.asarray(vmapped[1]).astype(np.float32))
  assert not np.array_equal(np.asarray(vmapped[1][0]), mask)

  batch = jax.jit(lambda k: aug.augment_batch(k, vols, masks, cfg, volumes_large=vols_l,
                                              masks_large=masks_l))(key)
  np.testing.assert_array_equal(np.asarray(batch[0]), np.asarray(vmapped[0]))
  np.testing.assert_array_equal(np.asarray(batch[1]), np.asarray(vmapped[1]))

  single = _jitted(cfg)
  one = single(keys[1], vols[1], mask, vols_l[1], mask_l)
  np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(batch[0][1]))
  np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(batch[1][1]))
  # Deterministic per key, different across keys.
  again = single(keys[1], vols[1], mask, vols_l[1], mask_l)
  np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(again[1]))
  assert not np.array_equal(np.asarray(one[1]), np.asarray(batch[1][0]))


def test_config_is_checked():
  cfg = aug.default_config()
  cfg.crop.p = 0.0
  cfg.elastic.units = "mm"
  with pytest.raises(ValueError, match="elastic.units"):
    aug.augment(jax.random.key(0), jnp.zeros((8, 8, 8)), None, cfg)
  cfg = aug.default_config()
  cfg.crop.p = 0.0
  cfg.rotate.plane = (1, 1)
  with pytest.raises(ValueError, match="rotate.plane"):
    aug.augment(jax.random.key(0), jnp.zeros((8, 8, 8)), None, cfg)
