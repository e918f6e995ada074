"""Properties that define full, 1g and 2g inflation, and the authors' rule to float rounding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.inflation import gaussian_profile, inflate_kernel, inflate_params
from covid3d.models import VARIANTS, ConvNeXt
from covid3d.models.convnext import PatchConv

NANO = dict(zip(("depths", "dims"), VARIANTS["nano"], strict=True))


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
    g = gaussian_profile(size, gaussian="centred")
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
@pytest.mark.parametrize("gaussian", ["authors", "centred"])
def test_inflated_stem_reproduces_2d_on_constant_depth(mode, gaussian):
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3, dwconv_impl="xla")
  p2 = model2d.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  p3 = inflate_params(p2, mode, gaussian=gaussian)
  slice2d = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
  volume = np.repeat(slice2d[:, None], 32, axis=1)
  stem = PatchConv(16, 4, norm_first=False)
  y2 = stem.apply({"params": p2["stem"]}, slice2d)
  y3 = stem.apply({"params": p3["stem"]}, volume)
  for d in range(y3.shape[1]):
    np.testing.assert_allclose(y3[:, d], y2, rtol=1e-4, atol=1e-4)


def test_inflate_params_tree_runs_in_3d_and_copies_linear_layers():
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3, dwconv_impl="xla")
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
  model2d = ConvNeXt(**NANO, spatial_dims=2, num_classes=3, dwconv_impl="xla")
  p2 = model2d.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  other = ConvNeXt(depths=(2, 2, 2, 2), dims=(16, 32, 64, 256), spatial_dims=3, num_classes=4,
                   dwconv_impl="xla")
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


# --- The authors' load_params3Dfromparams2D, transcribed to NumPy -----------------------------
# From KieDani/Submission_2nd_Covid19_Competition, training/models/convnext.py, the branches of
# init_mode full / one (init_kind g) / two (init_kind g), added_dim=2. PyTorch layout: the 2-D
# weight is (out, in, kH, kW), the 3-D one (out, in, kH, kW, new); float32 like their tensors.
# `rescale_in_loop=False` moves their 1g rescale after the loop (one factor per tensor).


def _authors_inflate(weight2d, init_mode, rescale_in_loop=True):
  weight2d = np.asarray(weight2d, np.float32)
  sws = weight2d.shape + (weight2d.shape[-1],)
  scaled_weight = np.zeros(sws, np.float32)
  mu = sws[-1] // 2
  sigma = mu / 4
  normal = lambda x: math.exp(-(x - mu) ** 2 / (2 * sigma ** 2))
  if init_mode == "full":
    scaled_weight = np.repeat(weight2d[..., None], weight2d.shape[-1], axis=-1) / sws[-1]
  elif init_mode == "one":
    if sws[-1] >= 3:
      for d3 in range(sws[-1]):
        scaled_weight[:, :, :, :, d3] = weight2d * np.float32(normal(d3))
        if rescale_in_loop:
          scaled_weight *= weight2d.sum() / scaled_weight.sum()
      if not rescale_in_loop:
        scaled_weight *= weight2d.sum() / scaled_weight.sum()
    else:
      scaled_weight[:, :, :, :, sws[-1] // 2] = weight2d
  elif init_mode == "two":
    if sws[-1] >= 3:
      for d3 in range(sws[-1]):
        scaled_weight[:, :, :, :, d3] += weight2d * np.float32(normal(d3))
      for d2 in range(sws[-2]):
        scaled_weight[:, :, :, d2, :] += weight2d * np.float32(normal(d2))
      scaled_weight *= weight2d.sum() / scaled_weight.sum()
    else:
      scaled_weight[:, :, :, :, sws[-1] // 2] = weight2d
      scaled_weight[:, :, :, sws[-2] // 2, :] = weight2d
      scaled_weight *= weight2d.sum() / scaled_weight.sum()
  return scaled_weight


_THEIR_MODE = {"full": "full", "1g": "one", "2g": "two"}


@pytest.mark.parametrize("size", [7, 4, 2])
@pytest.mark.parametrize("mode", ["full", "1g", "2g"])
@pytest.mark.parametrize("norm", ["sum_per_slice", "sum"])
def test_authors_rule_matches_their_code(size, mode, norm):
  torch_w = np.random.default_rng(size).normal(size=(3, 2, size, size)).astype(np.float32)
  theirs = _authors_inflate(torch_w, _THEIR_MODE[mode], rescale_in_loop=norm == "sum_per_slice")
  theirs = np.transpose(theirs, (2, 3, 4, 1, 0))  # (o, i, H, W, new) -> Flax (H, W, new, i, o)
  flax_w = np.transpose(torch_w, (2, 3, 1, 0))
  ours = inflate_kernel(flax_w, mode, norm=norm, new_axis=2, gaussian="authors")
  assert ours.shape == theirs.shape == (size,) * 3 + (2, 3)
  np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-6 * np.abs(theirs).max())
  # new_axis=0 is the same kernel with the new axis moved in front.
  np.testing.assert_array_equal(
      inflate_kernel(flax_w, mode, norm=norm, new_axis=0, gaussian="authors"),
      np.moveaxis(ours, 2, 0))


def test_authors_rule_on_even_kernels():
  k = _kernel((4, 4, 1, 1))
  ratio = inflate_kernel(k, "1g", gaussian="authors")[:, 1, 2, 0, 0] / k[1, 2, 0, 0]
  g = np.exp(-0.5 * ((np.arange(4) - 2) / 0.5) ** 2)  # mean 4 // 2 = 2, sigma (4 // 2) / 4
  np.testing.assert_allclose(ratio, g / g.sum(), rtol=1e-5)
  assert np.argmax(ratio) == 2
  # Two taps: no Gaussian; the 2-D kernel sits at index 1, zeros at index 0.
  k2 = _kernel((2, 2, 3, 4))
  k3 = inflate_kernel(k2, "1g", gaussian="authors")
  np.testing.assert_array_equal(k3[0], 0)
  np.testing.assert_allclose(k3[1], k2, rtol=1e-7)
  # 2g: both planes at index 1, their shared line once, one factor for the whole tensor.
  k3 = inflate_kernel(k2, "2g", gaussian="authors").astype(np.float64)
  kk = k2.astype(np.float64)
  laid = np.zeros((2, 2, 2, 3, 4))
  laid[1] = kk
  laid[:, :, 1] = np.transpose(kk, (1, 0, 2, 3))
  np.testing.assert_allclose(k3, laid * kk.sum() / laid.sum(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(k3.sum(), kk.sum(), rtol=1e-5)
  # 'centred' keeps the symmetric profile on every size.
  k3c = inflate_kernel(k2, "1g", gaussian="centred")
  np.testing.assert_allclose(k3c[0], k3c[1])


def test_sum_per_slice_distorts_1g_only():
  k = _kernel((7, 7, 1, 1))
  per_slice = inflate_kernel(k, "1g", norm="sum_per_slice")[:, 3, 3, 0, 0] / k[3, 3, 0, 0]
  np.testing.assert_allclose(per_slice, [0.2373, 0.0068, 0.1003, 0.3444, 0.2832, 0.0278, 0.0003],
                             atol=1e-4)
  np.testing.assert_allclose(per_slice.sum(), 1.0, rtol=1e-5)
  for mode in ("full", "2g"):
    np.testing.assert_array_equal(inflate_kernel(k, mode, norm="sum_per_slice"),
                                  inflate_kernel(k, mode, norm="sum"))


def test_l2_with_authors_small_2g():
  k = _kernel((2, 2, 3, 4))
  k3 = inflate_kernel(k, "2g", norm="l2", gaussian="authors")
  np.testing.assert_allclose(np.linalg.norm(k3), np.linalg.norm(k), rtol=1e-5)
  with pytest.raises(ValueError, match="not one of"):
    inflate_kernel(k, "1g", gaussian="paper")
