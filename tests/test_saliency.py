"""covid3d.saliency: Grad-CAM of a fine-tuned classifier on the last ConvNeXt stage."""
import jax
import jax.numpy as jnp
import numpy as np

from covid3d import config as base_config
from covid3d import saliency
from covid3d.models.convnext import ConvNeXt
from covid3d.models.heads import ClassificationHead
from covid3d.stages import build

SIZE = 64   # the last stage is 2^3: a map with structure to upsample


def _config():
  return base_config.load("severity:demo")


def test_grad_cam_is_finite_in_range_and_not_constant():
  config = _config()
  model = build.make_model(config, {"severity": 4}, segmentation=False)
  params = build.init_params(model, config, SIZE)
  x = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, SIZE, 1))
  # The Grad-CAM's split (backbone, then the head) computes the model's own logits.
  logits = build.apply_fn(model, config, "severity")(params, x, True, None)
  feats = ConvNeXt(**model.backbone).apply({"params": params["backbone"]},
                                           (x - config.data.mean) / config.data.std)[-1]
  assert feats.shape == (2, 2, 2, 2, model.backbone["dims"][-1])
  head = ClassificationHead(4, model.head_hidden)
  np.testing.assert_allclose(head.apply({"params": params["head_severity"]}, feats), logits,
                             rtol=1e-5, atol=1e-5)
  cam = jax.jit(saliency.grad_cam_fn(model, config, "severity"))
  for c in range(4):
    heat = np.asarray(cam(params, x, jnp.full((2,), c)))
    assert heat.shape == (2, SIZE, SIZE, SIZE) and np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    for b in range(2):   # each example: a map with a peak of 1, or all zeros
      assert heat[b].max() in (0.0, 1.0)
  peaked = [np.asarray(cam(params, x, jnp.full((2,), c)))[0] for c in range(4)]
  assert any(h.std() > 0.01 for h in peaked)   # not constant for some class
