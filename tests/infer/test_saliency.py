"""covid3d.saliency: Grad-CAM of a fine-tuned classifier on the last ConvNeXt stage."""
import jax
import jax.numpy as jnp
import numpy as np

from covid3d import config as base_config
from covid3d import saliency
from covid3d.models.convnext import ConvNeXt
from covid3d.models.heads import ClassificationHead
from covid3d.inference import build

SIZE = 64   # the last stage is 2^3: a map with structure to upsample


def _config():
  return base_config.load("severity:demo")


def _hand_written_grad_cam(head, head_params, features, c, size: int) -> np.ndarray:
  """Grad-CAM written out, one example at a time: ``(B, size, size, size)``.

  The gradient of the example's class score w.r.t. its feature map ``(d, h, w, K)``,
  averaged over space, weights the channels; the positive part of the weighted
  sum is upsampled (trilinear, half-pixel) and divided by its maximum.
  """
  maps = []
  for b in range(features.shape[0]):
    score = lambda a, b=b: head.apply({"params": head_params}, a[None])[0, c[b]]
    weights = np.asarray(jax.grad(score)(features[b])).mean(axis=(0, 1, 2))
    heat = np.maximum(np.einsum("dhwk,k->dhw", np.asarray(features[b]), weights), 0.0)
    heat = np.asarray(jax.image.resize(heat, (size,) * 3, "linear"))
    maps.append(heat / heat.max() if heat.max() > 0 else np.zeros_like(heat))
  return np.stack(maps)


def test_grad_cam_equals_a_hand_written_one():
  config = _config()
  model = build.make_model(config, {"severity": 4}, segmentation=False)
  # Random parameters of the model's shapes (no initialisation run).
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
                        jax.eval_shape(lambda: build.init_params(model, config, SIZE)))
  x = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, SIZE, 1))
  # The Grad-CAM's split (backbone, then the head) computes the model's own logits.
  apply = build.apply_fn(model, config, "severity")
  logits = jax.jit(lambda p, x: apply(p, x, True, None))(params, x)
  feats = jax.jit(ConvNeXt(**model.backbone).apply)(
      {"params": params["backbone"]}, (x - config.data.mean) / config.data.std)[-1]
  assert feats.shape == (2, 2, 2, 2, model.backbone["dims"][-1])
  head = ClassificationHead(4, model.head_hidden)
  np.testing.assert_allclose(jax.jit(head.apply)({"params": params["head_severity"]}, feats),
                             logits, rtol=1e-5, atol=1e-5)
  cam = jax.jit(saliency.grad_cam_fn(model, config, "severity"))
  peaked = []
  for c in ([0, 1], [2, 3], [1, 0], [3, 2]):   # each class on each example
    c = np.asarray(c)
    heat = np.asarray(cam(params, x, jnp.asarray(c)))
    assert heat.shape == (2, SIZE, SIZE, SIZE) and np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    np.testing.assert_allclose(
        heat, _hand_written_grad_cam(head, params["head_severity"], feats, c, SIZE),
        rtol=1e-4, atol=1e-5)
    peaked += [h for h in heat if h.max() == 1.0]
  assert any(h.std() > 0.01 for h in peaked)   # not constant for some example and class
