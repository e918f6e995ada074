"""Every depthwise-conv backend equals XLA's grouped convolution, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.models import DWCONV_IMPLS, choose_impl, depthwise_conv

CASES = [((2, 12, 10, 8, 3), 7), ((1, 9, 9, 9, 2), 3), ((2, 16, 12, 4), 7), ((1, 8, 8, 5), 4)]


def _inputs(x_shape, k):
  kx, kk, kb = jax.random.split(jax.random.key(0), 3)
  nd = len(x_shape) - 2
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, (k,) * nd + (1, x_shape[-1]))
  bias = jax.random.normal(kb, (x_shape[-1],))
  return x, kernel, bias


def _reference(x, kernel, bias):
  """Direct numpy cross-correlation with zero 'same' padding (left pad (k-1)//2)."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  nd = x.ndim - 2
  ks = kernel.shape[:nd]
  xp = np.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in ks] + [(0, 0)])
  out = np.zeros_like(x)
  for tap in np.ndindex(*ks):
    sl = (slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, x.shape[1:-1]))
    out += xp[sl] * kernel[tap][0]
  return out + np.asarray(bias)


@pytest.mark.parametrize("x_shape,k", CASES)
@pytest.mark.parametrize("impl", DWCONV_IMPLS)
def test_forward_matches_reference(impl, x_shape, k):
  x, kernel, bias = _inputs(x_shape, k)
  y = jax.jit(depthwise_conv, static_argnums=3)(x, kernel, bias, impl)
  np.testing.assert_allclose(y, _reference(x, kernel, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,k", CASES[:3])
@pytest.mark.parametrize("impl", [i for i in DWCONV_IMPLS if i != "xla"])
def test_gradients_match_xla(impl, x_shape, k):
  x, kernel, bias = _inputs(x_shape, k)
  target = jax.random.normal(jax.random.key(1), x_shape)

  def loss(impl, x, kernel, bias):
    return jnp.sum((depthwise_conv(x, kernel, bias, impl) - target) ** 2)

  ref = jax.grad(loss, (1, 2, 3))("xla", x, kernel, bias)
  got = jax.grad(loss, (1, 2, 3))(impl, x, kernel, bias)
  for r, g in zip(ref, got):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


def test_auto_measures_and_remembers(tmp_path, monkeypatch):
  monkeypatch.setenv("COVID3D_CACHE_DIR", str(tmp_path))
  shape, kshape = (1, 8, 8, 8, 4), (3, 3, 3, 1, 4)
  best = choose_impl(shape, kshape)
  assert best in DWCONV_IMPLS
  table = (tmp_path / "dwconv_auto.json").read_text()
  assert best in table and "seconds" in table
  x, kernel, bias = _inputs(shape, 3)
  y = jax.jit(lambda a, b, c: depthwise_conv(a, b, c, "auto"))(x, kernel, bias)
  np.testing.assert_allclose(y, _reference(x, kernel, bias), rtol=1e-4, atol=1e-4)


def test_bad_arguments():
  x, kernel, bias = _inputs((1, 8, 8, 8, 4), 3)
  with pytest.raises(ValueError, match="not one of"):
    depthwise_conv(x, kernel, bias, "cudnn")
  with pytest.raises(ValueError, match="does not match"):
    depthwise_conv(x, kernel[..., :2], bias, "xla")
