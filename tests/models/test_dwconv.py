"""Every depthwise-conv backend equals XLA's grouped convolution, forward and backward.

``pallas`` runs in Pallas's interpreter on CPU, whose compile time (about 1-2 s
per kernel) would dominate the generic tables below; it has its own cases at
the end (odd channel counts, sizes no block divides, bfloat16, the GPU's
power-of-two tiling, the model).
"""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.models import DWCONV_IMPLS, ConvNeXt, choose_impl, depthwise_conv
from covid3d.models import dwconv, dwconv_tune
from covid3d.models.dwconv import auto_candidates, lax_depthwise_conv
from covid3d.models.dwconv_pallas import depthwise_conv_pallas

CASES = [((2, 12, 10, 8, 3), 7), ((1, 9, 9, 9, 2), 3), ((2, 16, 12, 4), 7), ((1, 8, 8, 5), 4)]
FAST_IMPLS = [i for i in DWCONV_IMPLS if i != "pallas"]


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
    sl = (slice(None),) + tuple(slice(t, t + n) for t, n in zip(tap, x.shape[1:-1], strict=True))
    out += xp[sl] * kernel[tap][0]
  return out + np.asarray(bias)


@pytest.mark.parametrize("x_shape,k", CASES)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_forward_matches_reference(impl, x_shape, k):
  x, kernel, bias = _inputs(x_shape, k)
  y = jax.jit(depthwise_conv, static_argnums=3)(x, kernel, bias, impl)
  np.testing.assert_allclose(y, _reference(x, kernel, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,k", CASES[:3])
@pytest.mark.parametrize("impl", [i for i in FAST_IMPLS if i != "xla"])
def test_gradients_match_xla(impl, x_shape, k):
  x, kernel, bias = _inputs(x_shape, k)
  target = jax.random.normal(jax.random.key(1), x_shape)

  def loss(impl, x, kernel, bias):
    return jnp.sum((depthwise_conv(x, kernel, bias, impl) - target) ** 2)

  ref = jax.grad(loss, (1, 2, 3))("xla", x, kernel, bias)
  got = jax.grad(loss, (1, 2, 3))(impl, x, kernel, bias)
  for r, g in zip(ref, got, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


def test_auto_measures_and_remembers(tmp_path, monkeypatch):
  monkeypatch.setenv("COVID3D_CACHE_DIR", str(tmp_path))
  shape, kshape = (1, 8, 8, 8, 4), (3, 3, 3, 1, 4)
  best = choose_impl(shape, kshape)
  assert best in auto_candidates() and best != "pallas"  # CPU: the interpreter is not timed
  table = (tmp_path / "dwconv_auto.json").read_text()
  assert best in table and "seconds" in table and '"pallas"' not in table
  x, kernel, bias = _inputs(shape, 3)
  y = jax.jit(lambda a, b, c: depthwise_conv(a, b, c, "auto"))(x, kernel, bias)
  np.testing.assert_allclose(y, _reference(x, kernel, bias), rtol=1e-4, atol=1e-4)


def _slowed(fn, times: int, traced: list):
  """``fn`` applied ``times`` times in a row (each on the last's output): about ``times`` times
  its cost; the shapes it is traced with are appended to ``traced``."""
  def slow(x, kernel):
    traced.append(tuple(x.shape))
    return jax.lax.fori_loop(0, times, lambda i, y: fn(y, kernel) / 8, x)
  return slow


def test_auto_leaves_a_slow_backend_at_the_small_shape(tmp_path, monkeypatch, caplog):
  """A backend 100x slower than another is timed only at the probe's shape, never at the
  layer's own (nor is the other, left alone); the table and the one log line say so, with
  the seconds the tuning took."""
  monkeypatch.setenv("COVID3D_CACHE_DIR", str(tmp_path))
  fft = dwconv._BACKENDS["fft"]
  traced = []
  shape, kshape = (2, 32, 32, 32, 8), (3, 3, 3, 1, 8)
  probe = dwconv_tune.probe_shapes(shape, kshape)
  assert probe == ((1, 16, 16, 16, 8), (3, 3, 3, 1, 8))
  with caplog.at_level(logging.INFO, logger=dwconv_tune.__name__):
    best = dwconv_tune.choose({"slow": _slowed(fft, 100, traced), "fast": fft}, shape, kshape)
  assert best == "fast"
  assert traced and set(traced) == {probe[0]}   # never traced at (2, 32, 32, 32, 8)
  entry = json.loads((tmp_path / dwconv_tune.TABLE).read_text())[
      dwconv_tune.cache_key(shape, kshape, "float32", ("slow", "fast"))]
  # The only one left after the probe: chosen without timing the shape itself.
  assert entry["seconds"] == {} and set(entry["probe"]["seconds"]) == {"slow", "fast"}
  assert entry["probe"]["shape"] == list(probe[0])
  assert entry["abandoned"]["slow"][0] == list(probe[0])
  assert entry["abandoned"]["slow"][1] > dwconv_tune.PROBE_SLOWER
  assert entry["tuning_s"] > 0
  [line] = [r.getMessage() for r in caplog.records if r.name == dwconv_tune.__name__]
  assert line.startswith("dwconv auto 2x32x32x32x8 kernel 3x3x3: fast (the only one left)")
  assert "slow left at 1x16x16x16x8" in line
  assert f"tuned in {entry['tuning_s']:.1f} s" in line


def test_auto_abandons_a_slow_backend_after_one_call(tmp_path, monkeypatch):
  """A shape too small for a probe round: the slow backend gets one call, not three."""
  monkeypatch.setenv("COVID3D_CACHE_DIR", str(tmp_path))
  fft = dwconv._BACKENDS["fft"]
  shape, kshape = (1, 16, 16, 16, 8), (3, 3, 3, 1, 8)
  assert dwconv_tune.probe_shapes(shape, kshape) is None
  assert dwconv_tune.choose({"fast": fft, "slow": _slowed(fft, 20, [])}, shape, kshape) == "fast"
  entry = dwconv_tune.read_table()[dwconv_tune.cache_key(shape, kshape, "float32",
                                                         ("fast", "slow"))]
  assert "probe" not in entry and set(entry["seconds"]) == {"fast"}
  assert entry["abandoned"]["slow"][0] == list(shape)
  assert entry["abandoned"]["slow"][1] > dwconv_tune.SLOWER


def test_bad_arguments():
  x, kernel, bias = _inputs((1, 8, 8, 8, 4), 3)
  with pytest.raises(ValueError, match="not one of"):
    depthwise_conv(x, kernel, bias, "cudnn")
  with pytest.raises(ValueError, match="does not match"):
    depthwise_conv(x, kernel[..., :2], bias, "xla")


def test_auto_candidates_leave_the_pallas_interpreter_out_on_cpu():
  assert "pallas" not in auto_candidates("cpu")
  assert "pallas" in auto_candidates("gpu") and "pallas" in auto_candidates("tpu")


# ------------------------------------------------------------------- pallas

def _value_and_vjp(fn, x, kernel, cotangent):
  """Output and (dx, dkernel) for ``cotangent``, in one jitted program."""
  @jax.jit
  def run(x, kernel):
    y, vjp = jax.vjp(fn, x, kernel)
    return y, vjp(cotangent.astype(y.dtype))
  return run(x, kernel)


# (input shape, kernel size, dtype, block sizes): 2-D and 3-D, k 3 and 7, 5 and
# 20 channels, sizes 9 and 13 that the blocks do not divide; pow2 is the GPU's
# (Triton's) power-of-two tiling, here run by the interpreter, with the kernel
# gradient's H split into groups of row tiles (kgrad_programs).
# Each case compiles three interpreted kernels (2-3 s on 2 idle cores): four
# cover every axis of the matrix, the other four are marked slow.
_slow = pytest.mark.slow
PALLAS_CASES = [
    ((1, 9, 13, 9, 20), 7, "float32", {"block_c": 8, "block_d": 4, "block_h": 4}),
    ((1, 9, 13, 20), 3, "float32", {"block_c": 8, "block_d": 4}),
    ((1, 9, 9, 13, 20), 7, "bfloat16", {"block_c": 16, "block_d": 2}),
    ((1, 9, 13, 7, 5), 7, "float32", {"pow2": True, "block_h": 2, "kgrad_programs": 4}),
    pytest.param((2, 9, 13, 7, 5), 3, "float32", {}, marks=_slow),
    pytest.param((2, 13, 9, 5), 7, "float32", {"block_d": 4}, marks=_slow),
    pytest.param((2, 13, 9, 5), 3, "bfloat16", {}, marks=_slow),
    pytest.param((1, 13, 9, 20), 7, "bfloat16", {"pow2": True, "block_c": 8, "block_d": 4},
                 marks=_slow),
]


@pytest.mark.parametrize("x_shape,k,dtype,blocks", PALLAS_CASES)
def test_pallas_equals_lax_forward_and_gradients(x_shape, k, dtype, blocks):
  nd = len(x_shape) - 2
  kx, kk, kc = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  kernel = jax.random.normal(kk, (k,) * nd + (1, x_shape[-1])).astype(dtype)
  cot = jax.random.normal(kc, x_shape)
  got = _value_and_vjp(lambda a, b: depthwise_conv_pallas(a, b, **blocks), x, kernel, cot)
  # The reference in float32 from the same (rounded) inputs: both accumulate in float32.
  ref = _value_and_vjp(lax_depthwise_conv, x.astype(jnp.float32), kernel.astype(jnp.float32), cot)
  assert got[0].dtype == x.dtype and got[1][0].dtype == x.dtype and got[1][1].dtype == x.dtype
  # float32: summation order only; bfloat16: the rounding of the output.
  rtol = 1e-5 if dtype == "float32" else 1e-2
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
    g, r = np.asarray(g, np.float32), np.asarray(r)
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * float(np.abs(r).max()))


def test_pallas_through_depthwise_conv_with_bias():
  x, kernel, bias = _inputs((1, 9, 7, 13, 5), 7)
  y = jax.jit(depthwise_conv, static_argnums=3)(x, kernel, bias, "pallas")
  np.testing.assert_allclose(y, _reference(x, kernel, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pallas_grad_through_depthwise_conv_with_bias():
  x, kernel, bias = _inputs((1, 9, 7, 13, 5), 7)

  def loss(impl, x, kernel, bias):
    return jnp.sum(jnp.sin(depthwise_conv(x, kernel, bias, impl)))

  ref = jax.grad(loss, (1, 2, 3))("xla", x, kernel, bias)
  got = jax.jit(jax.grad(loss, (1, 2, 3)), static_argnums=0)("pallas", x, kernel, bias)
  for r, g in zip(ref, got, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_pallas_rejects_a_mismatched_kernel():
  with pytest.raises(ValueError, match="does not fit"):
    depthwise_conv_pallas(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 1, 5)))


def _tiny_model_and_params(x):
  """ConvNeXt with nano's widths, one block per stage, random parameters.

  Parameters come from ``jax.eval_shape`` plus numpy draws: compiling
  ``model.init`` takes about a minute on this CPU.
  """
  model = ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=2, dwconv_impl="xla")
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
  return model, params


def test_default_backend_is_auto():
  assert ConvNeXt().dwconv_impl == "auto"


def test_pallas_inside_the_model_equals_xla():
  # The smallest input ConvNeXt takes is 32^3 (total stride 32).
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
  model, params = _tiny_model_and_params(x)
  ref = jax.jit(model.apply)({"params": params}, x)
  got = jax.jit(model.clone(dwconv_impl="pallas").apply)({"params": params}, x)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.slow
def test_pallas_model_gradients_equal_xla():
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
  model, params = _tiny_model_and_params(x)

  def grads(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)))(params)

  ref, got = grads(model), grads(model.clone(dwconv_impl="pallas"))
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()) + 1e-7)
