"""ConvNeXt, heads and the multitask model."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.models import VARIANTS, ConvNeXt, MultitaskModel, UperNetHead
from covid3d.models.heads import ClassificationHead
from covid3d.models.ops import adaptive_avg_pool, resize_linear

NANO = dict(zip(("depths", "dims"), VARIANTS["nano"], strict=True))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _randomised(params, seed):
  """The same tree with every leaf N(0, 0.5) (LayerNorm scales and biases too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (0.5 * rng.standard_normal(p.shape)).astype(np.float32), params)


def _random_params(model, x, seed=0):
  """Random parameters of ``model`` for inputs like ``x``, its shapes from ``jax.eval_shape``
  (no initialisation run: where only shapes and the forward pass matter)."""
  return _randomised(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed)


@pytest.mark.parametrize("name,millions", [("tiny", 28.59), ("small", 50.22), ("base", 88.59),
                                           ("large", 197.77)])
def test_2d_parameter_counts_equal_official(name, millions):
  depths, dims = VARIANTS[name]
  model = ConvNeXt(depths=depths, dims=dims, spatial_dims=2, in_chans=3, num_classes=1000,
                   dwconv_impl="xla")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert round(_count(shapes) / 1e6, 2) == millions


def test_3d_features_and_logits_shapes():
  x = jax.ShapeDtypeStruct((2, 64, 32, 32, 1), jnp.float32)
  feats_model = ConvNeXt(**NANO, dwconv_impl="fft")
  variables = jax.eval_shape(feats_model.init, jax.random.key(0), x)
  feats = jax.eval_shape(feats_model.apply, variables, x)
  assert [f.shape for f in feats] == [(2, 16, 8, 8, 16), (2, 8, 4, 4, 32), (2, 4, 2, 2, 64),
                                      (2, 2, 1, 1, 128)]
  model = ConvNeXt(**NANO, num_classes=4, head_hidden=128, dwconv_impl="fft")
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert variables["params"]["head"]["pre_head"]["kernel"].shape == (128, 128)
  assert variables["params"]["stage1"]["block0"]["dwconv"]["kernel"].shape == (7, 7, 7, 1, 32)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 4)


def test_stem_is_patchify_and_layer_scale_initialised():
  model = ConvNeXt(**NANO, num_classes=2, layer_scale_init=1e-6, dwconv_impl="xla")
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 32, 32, 32, 1)))["params"]
  assert params["stem"]["conv"]["kernel"].shape == (4, 4, 4, 1, 16)
  assert params["down2"]["conv"]["kernel"].shape == (2, 2, 2, 32, 64)
  np.testing.assert_array_equal(params["stage3"]["block1"]["gamma"], np.full(128, 1e-6, np.float32))


def test_drop_path_only_when_not_deterministic():
  model = ConvNeXt(**NANO, num_classes=3, drop_path_rate=0.9, layer_scale_init=1.0,
                   dwconv_impl="fft")
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 32, 1))
  variables = {"params": _random_params(model, x)}
  apply = jax.jit(model.apply, static_argnames="deterministic")
  a = apply(variables, x, deterministic=True)
  b = apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(a, b)
  c = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  d = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(c, a) and not np.allclose(c, d)


@pytest.mark.parametrize("remat", ["block", "stage"])
def test_remat_gives_same_gradients(remat):
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
  plain = ConvNeXt(**NANO, num_classes=2, dwconv_impl="fft", layer_scale_init=0.5)
  params = jax.jit(plain.init)(jax.random.key(0), x)["params"]

  def grads(model):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)

  ref = grads(plain)
  got = grads(plain.clone(remat=remat))
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    # Compiled apart, the two programs round apart: atol scales with the leaf.
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


def test_bfloat16_compute_keeps_float32_params():
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
  model = ConvNeXt(**NANO, num_classes=2, dwconv_impl="fft", layer_scale_init=0.5)
  params = _random_params(model, x)
  ref = jax.jit(model.apply)({"params": params}, x)
  low = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, ref, atol=0.1 * float(jnp.abs(ref).max()) + 1e-2)


def test_backends_agree_through_the_model():
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 32, 1))
  model = ConvNeXt(**NANO, num_classes=2, layer_scale_init=0.5, dwconv_impl="xla")
  variables = {"params": _random_params(model, x)}
  ref = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(jax.jit(model.clone(dwconv_impl="fft").apply)(variables, x), ref,
                             rtol=1e-4, atol=1e-5 * float(jnp.abs(ref).max()))


def test_bad_inputs_raise():
  model = ConvNeXt(**NANO, num_classes=2)
  with pytest.raises(ValueError, match="divisible by 32"):
    model.init(jax.random.key(0), jnp.ones((1, 40, 32, 32, 1)))
  with pytest.raises(ValueError, match="expects input"):
    model.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))


def test_resize_matches_torch_conventions():
  # align_corners=True keeps the end points; half-pixel equals jax.image.resize.
  x = jax.random.normal(jax.random.key(0), (1, 5, 7, 2))
  y = resize_linear(x, (9, 13), align_corners=True)
  np.testing.assert_allclose(y[:, 0, 0], x[:, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(y[:, -1, -1], x[:, -1, -1], rtol=1e-6)
  np.testing.assert_allclose(y[:, 4, 6], (x[:, 2, 3]), rtol=1e-5)
  z = resize_linear(x, (10, 14), align_corners=False)
  np.testing.assert_allclose(z, jax.image.resize(x, (1, 10, 14, 2), "linear"), rtol=1e-5, atol=1e-6)


def test_adaptive_pool_matches_block_means():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 6, 2))
  y = adaptive_avg_pool(x, (3, 2, 1))
  ref = np.asarray(x).reshape(1, 3, 2, 2, 3, 1, 6, 2).mean(axis=(2, 4, 6))
  np.testing.assert_allclose(y, ref, rtol=1e-5)


@pytest.mark.parametrize("style", ["upernext", "upernet"])
def test_upernet_head_outputs_input_resolution(style):
  x = jax.ShapeDtypeStruct((1, 64, 32, 32, 1), jnp.float32)
  backbone = ConvNeXt(**NANO, dwconv_impl="fft")
  feats = jax.eval_shape(backbone.apply, jax.eval_shape(backbone.init, jax.random.key(0), x), x)
  head = UperNetHead(style=style, channels=8, fuse_kernel=3, num_classes=2)
  out, _ = jax.eval_shape(lambda k, f: head.init_with_output(k, f, (64, 32, 32)),
                          jax.random.key(1), feats)
  assert out.shape == (1, 64, 32, 32, 2) and out.dtype == jnp.float32


@pytest.mark.parametrize("style", ["upernext", "upernet"])
def test_upernet_head_prior_sets_the_initial_probability(style):
  feats = [jnp.zeros((1,) + (8 // 2 ** i,) * 3 + (4,)) for i in range(4)]
  head = UperNetHead(style=style, channels=4, fuse_kernel=3, prior=0.01)
  out, variables = head.init_with_output(jax.random.key(1), feats)
  assert float(variables["params"]["classifier"]["bias"][0]) == pytest.approx(np.log(0.01 / 0.99))
  # Zero features: the logits are the bias alone, so the probability is the prior.
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(out)), 0.01, rtol=1e-5)
  with pytest.raises(ValueError, match="prior"):
    UperNetHead(style=style, prior=1.5).init(jax.random.key(1), feats)


def test_multitask_returns_named_heads():
  x = jnp.ones((2, 32, 32, 32, 1))
  model = MultitaskModel(backbone=dict(NANO, dwconv_impl="fft"), heads={"severity": 4, "stoic": 2},
                         segmentation=True, seg_head={"channels": 8, "fuse_kernel": 3})
  variables = {"params": _random_params(model, x)}
  out = jax.jit(model.apply)(variables, x)
  assert set(out) == {"severity", "stoic", "segmentation"}
  assert out["severity"].shape == (2, 4) and out["stoic"].shape == (2, 2)
  assert out["segmentation"].shape == (2, 32, 32, 32, 1)
  assert set(variables["params"]) == {"backbone", "head_severity", "head_stoic", "seg_head"}
  # Each output is its head applied by hand to the backbone's features.
  p = variables["params"]
  feats = jax.jit(ConvNeXt(**NANO, dwconv_impl="fft").apply)({"params": p["backbone"]}, x)
  seg = jax.jit(UperNetHead(channels=8, fuse_kernel=3).apply, static_argnums=2)(
      {"params": p["seg_head"]}, feats, (32, 32, 32))
  np.testing.assert_allclose(out["segmentation"], seg, rtol=1e-5, atol=1e-6)
  for name, n in (("severity", 4), ("stoic", 2)):
    logits = jax.jit(ClassificationHead(n).apply)({"params": p[f"head_{name}"]}, feats[-1])
    np.testing.assert_allclose(out[name], logits, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="features-only"):
    jax.eval_shape(MultitaskModel(backbone=dict(NANO, num_classes=3), heads={}).init,
                   jax.random.key(0), x)


# --- head values against numpy re-implementations ---------------------------

def _np_layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * np.float64(p["scale"]) + np.float64(p["bias"])


def _np_dense(x, p):
  return x @ np.float64(p["kernel"]) + np.float64(p["bias"])


def _np_conv_same(x, p):
  """Stride-1 'SAME' cross-correlation of ``(B, D, H, W, Cin)`` with ``(k, k, k, Cin, Cout)``."""
  kernel = np.float64(p["kernel"])
  ks = kernel.shape[:3]
  xp = np.pad(x, [(0, 0)] + [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks] + [(0, 0)])
  out = np.zeros(x.shape[:-1] + kernel.shape[-1:])
  d, h, w = x.shape[1:4]
  for a, b, c in itertools.product(*[range(k) for k in ks]):
    out += xp[:, a:a + d, b:b + h, c:c + w] @ kernel[a, b, c]
  return out + np.float64(p["bias"])


def _np_resize_align_corners(x, shape):
  """Separable linear resize, end points onto end points, via np.interp."""
  for axis, n_out in enumerate(shape, start=1):
    n_in = x.shape[axis]
    pos = np.linspace(0.0, n_in - 1, n_out)
    m = np.stack([np.interp(pos, np.arange(n_in), e) for e in np.eye(n_in)], axis=1)
    x = np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), axes=1), 0, axis)
  return x


@pytest.mark.parametrize("hidden", [None, 16])
def test_classification_head_values_match_numpy(hidden):
  x = jax.random.normal(jax.random.key(0), (3, 2, 3, 4, 8))
  head = ClassificationHead(num_classes=5, hidden=hidden)
  params = _randomised(jax.eval_shape(head.init, jax.random.key(1), x)["params"], seed=2)
  assert set(params) == ({"norm", "fc"} | ({"pre_head"} if hidden else set()))
  got = jax.jit(head.apply)({"params": params}, x)
  ref = _np_layer_norm(np.float64(x).mean(axis=(1, 2, 3)), params["norm"])
  if hidden:
    assert params["pre_head"]["kernel"].shape == (8, hidden)
    pre = _np_dense(ref, params["pre_head"])
    assert (pre < 0).any() and (pre > 0).any()  # the ReLU matters here
    ref = np.maximum(pre, 0.0)
  ref = _np_dense(ref, params["fc"])
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_upernext_head_values_match_numpy():
  # Non-cubic levels of unequal sizes and widths, an output size that is not 4x.
  shapes = [(8, 6, 4, 3), (4, 3, 2, 5), (2, 2, 1, 6), (1, 1, 1, 7)]
  keys = jax.random.split(jax.random.key(0), 4)
  feats = [jax.random.normal(k, (2,) + s) for k, s in zip(keys, shapes, strict=True)]
  out_shape = (10, 13, 7)
  head = UperNetHead(style="upernext", channels=4, fuse_kernel=3, num_classes=2)
  shapes_only = jax.eval_shape(lambda k, f: head.init(k, f, out_shape), jax.random.key(1), feats)
  params = _randomised(shapes_only["params"], seed=3)
  got = jax.jit(head.apply, static_argnums=2)({"params": params}, feats, out_shape)

  def conv_norm_relu(x, p):
    return np.maximum(_np_layer_norm(_np_conv_same(x, p["conv"]), p["norm"]), 0.0)

  base = shapes[0][:3]
  levels = [_np_resize_align_corners(conv_norm_relu(np.float64(f), params[f"lateral{i}"]), base)
            for i, f in enumerate(feats)]
  x = np.concatenate(levels, axis=-1)
  x = conv_norm_relu(x, params["fuse0"])
  x = conv_norm_relu(x, params["fuse1"])
  x = _np_conv_same(x, params["classifier"])
  ref = _np_resize_align_corners(x, out_shape)
  assert got.shape == (2,) + out_shape + (2,)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
