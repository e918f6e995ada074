"""Properties that define full, 1g and 2g inflation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.inflation import gaussian_profile, inflate_kernel, inflate_params
from covid3d.models import VARIANTS, ConvNeXt
from covid3d.models.convnext import PatchConv

NANO = dict(zip(("depths", "dims"), VARIANTS["nano"]))


def _kernel(shape=(7, 7, 2, 3), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("mode", ["full", "1g", "2g"])
def test_sum_norm_preserves_sum_per_filter(mode):
  k = _kernel()
  k3 = inflate_kernel(k, mode)
  assert k3.shape == (7, 7, 7, 2, 3)
  np.testing.assert_allclose(k3.sum(axis=(0, 1, 2)), k.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "1g", "2g"])
def test_l2_norm_preserves_l2(mode):
  k = _kernel()
  np.testing.assert_allclose(np.linalg.norm(inflate_kernel(k, mode, norm="l2")), np.linalg.norm(k),
                             rtol=1e-5)


def test_gaussian_profile_centred():
  for size in (2, 4, 7):
    g = gaussian_profile(size)
    np.testing.assert_allclose(g, g[::-1], rtol=1e-12)
    np.testing.assert_allclose(g.sum(), 1.0)
  g7 = gaussian_profile(7)
  assert np.argmax(g7) == 3
  # sigma = (7 // 2) / 4 = 0.75 taps, the authors' rule.
  np.testing.assert_allclose(g7[4] / g7[3], np.exp(-0.5 / 0.75 ** 2), rtol=1e-12)


def test_1g_profile_along_new_axis():
  k = _kernel((7, 7, 1, 1))
  k3 = inflate_kernel(k, "1g")
  ratio = k3[:, 2, 5, 0, 0] / k[2, 5, 0, 0]
  np.testing.assert_allclose(ratio, gaussian_profile(7), rtol=1e-5)
  moved = inflate_kernel(k, "1g", new_axis=2)
  np.testing.assert_allclose(moved, np.moveaxis(k3, 0, 2))


def test_2g_uses_two_planes():
  k = np.zeros((7, 7, 1, 1), np.float32)
  k[1, 5] = 1.0
  k3 = inflate_kernel(k, "2g")[..., 0, 0]
  g = gaussian_profile(7)
  # Plane (H, W) weighted along D: nonzero at (d, 1, 5).
  # Plane (H, D) weighted along W: K[h, d] lands at (5, 1, w).
  expected = np.zeros((7, 7, 7))
  expected[:, 1, 5] += 0.5 * g
  expected[5, 1, :] += 0.5 * g
  np.testing.assert_allclose(k3, expected, rtol=1e-6, atol=1e-9)
  assert np.count_nonzero(k3) == 13


@pytest.mark.parametrize("mode", ["full", "1g"])
def test_inflated_stem_reproduces_2d_on_constant_depth(mode):
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3)
  p2 = model2d.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  p3 = inflate_params(p2, mode)
  slice2d = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
  volume = np.repeat(slice2d[:, None], 32, axis=1)
  stem = PatchConv(16, 4, norm_first=False)
  y2 = stem.apply({"params": p2["stem"]}, slice2d)
  y3 = stem.apply({"params": p3["stem"]}, volume)
  for d in range(y3.shape[1]):
    np.testing.assert_allclose(y3[:, d], y2, rtol=1e-4, atol=1e-4)


def test_inflate_params_tree_runs_in_3d_and_copies_linear_layers():
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3)
  model3d = ConvNeXt(**NANO, spatial_dims=3, num_classes=3, dwconv_impl="fft")
  p2 = model2d.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  target = jax.eval_shape(model3d.init, jax.random.key(0), jnp.ones((1, 32, 32, 32, 1)))["params"]
  p3 = inflate_params(p2, "2g", target=target)
  np.testing.assert_array_equal(p3["stage1"]["block0"]["pwconv1"]["kernel"],
                                p2["stage1"]["block0"]["pwconv1"]["kernel"])
  np.testing.assert_array_equal(p3["stage1"]["block0"]["norm"]["scale"],
                                p2["stage1"]["block0"]["norm"]["scale"])
  assert model3d.apply({"params": p3}, jnp.ones((1, 32, 32, 32, 1))).shape == (1, 3)


def test_mismatched_tree_is_one_clear_error():
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3)
  p2 = model2d.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  other = ConvNeXt(depths=(2, 2, 2, 2), dims=(16, 32, 64, 256), spatial_dims=3, num_classes=4)
  target = jax.eval_shape(other.init, jax.random.key(0), jnp.ones((1, 32, 32, 32, 1)))["params"]
  with pytest.raises(ValueError) as err:
    inflate_params(p2, "full", target=target)
  msg = str(err.value)
  assert "stage3/block0/pwconv1/kernel" in msg and "head/fc/kernel" in msg
  p3 = inflate_params(p2, "full")
  with pytest.raises(ValueError, match="already 3-D"):
    inflate_params(p3, "full")
  with pytest.raises(ValueError, match="not one of"):
    inflate_kernel(np.zeros((3, 3, 1, 1)), "3g")
