"""Grad-CAM of a fine-tuned classifier on the last ConvNeXt stage.

For the class ``c`` a model predicts, Grad-CAM (Selvaraju et al. 2017) weights
each channel ``k`` of the last stage's features ``A`` (B, d, h, w, K) by the
spatial mean of ``d logit_c / d A_k`` and keeps the positive part of the
weighted sum: ``relu(sum_k w_k A_k)``, a (d, h, w) map at 1/32 of the input
resolution, upsampled trilinearly to the input cube and scaled to [0, 1]
(divided by its maximum; all zeros when nothing speaks for the class).
"""
import jax
import jax.numpy as jnp
import numpy as np

from covid3d.models.convnext import ConvNeXt
from covid3d.models.heads import ClassificationHead
from covid3d.models.ops import resize_linear


def grad_cam_fn(model, config, label: str):
  """``cam(params, x, c)``: Grad-CAM (B, s, s, s) in [0, 1] of class ``c`` (B,) for inputs
  ``x`` (B, s, s, s, 1) in [0, 1], for a ``MultitaskModel`` with the head ``label``."""
  backbone = ConvNeXt(**model.backbone)
  head = ClassificationHead(model.heads[label], model.head_hidden, backbone.dtype)
  mean, std = config.data.mean, config.data.std

  def cam(params, x, c):
    features = backbone.apply({"params": params["backbone"]}, (x - mean) / std)[-1]

    def chosen_logit(f):
      logits = head.apply({"params": params[f"head_{label}"]}, f)
      return jnp.sum(jnp.take_along_axis(logits, c[:, None], axis=1))

    grads = jax.grad(chosen_logit)(features)
    spatial = tuple(range(1, features.ndim - 1))
    weights = jnp.mean(grads, axis=spatial, keepdims=True)
    heat = jax.nn.relu(jnp.sum(weights * features, axis=-1, keepdims=True)).astype(jnp.float32)
    heat = resize_linear(heat, x.shape[1:-1], align_corners=False)[..., 0]
    peak = jnp.max(heat, axis=spatial, keepdims=True)
    return jnp.where(peak > 0, heat / jnp.where(peak > 0, peak, 1.0), 0.0)
  return cam


def ensemble_grad_cam(config, ensemble):
  """``fn(x, c)`` -> numpy (B, s, s, s): the mean Grad-CAM of the ensemble's folds."""
  cam = jax.jit(grad_cam_fn(ensemble.model, config, ensemble.label))

  def fn(x, c):
    x, c = jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.int32)
    return np.mean([np.asarray(cam(p, x, c)) for p in ensemble.params], axis=0)
  return fn
