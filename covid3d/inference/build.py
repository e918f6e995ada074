"""A stage's model from its config: backbone options, heads, initial parameters.

Reads ``config.model`` (variant, drop path, layer scale, head, depthwise
backend, rematerialisation, segmentation head) and ``config.train.compute_dtype``.
3-D stages get a ``MultitaskModel``; the 2-D pretraining gets a ``ConvNeXt``.
It is not in ``covid3d.models`` because it reads the training config and wraps
models for ``covid3d.train``: the models depend on neither. The stages build
their models with it, and inference rebuilds a finished stage's model from the
config the workdir saved.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from covid3d.models.convnext import ConvNeXt
from covid3d.models.multitask import MultitaskModel
from covid3d.models.variants import variant
from covid3d.train import steps
from covid3d.train.config import compute_dtype


def backbone_kwargs(config: ml_collections.ConfigDict, spatial_dims: int = 3) -> dict:
  """``ConvNeXt`` fields (one input channel, features only) from ``config.model``."""
  m = config.model
  return dict(variant(m.variant), spatial_dims=spatial_dims, in_chans=1,
              drop_path_rate=m.drop_path_rate, layer_scale_init=m.layer_scale_init,
              dwconv_impl=m.dwconv_impl, remat=m.remat,
              dtype=compute_dtype(config.train.compute_dtype))


def make_model(config: ml_collections.ConfigDict, heads: Mapping[str, int],
               segmentation: bool) -> MultitaskModel:
  """The 3-D model of a stage: backbone + named classification heads (+ segmentation head).

  Args:
    heads: head name -> number of classes, e.g. ``{"severity": 4}``.
    segmentation: add the ``seg_head`` (``config.model.seg_head``).
  """
  return MultitaskModel(backbone=backbone_kwargs(config), heads=dict(heads),
                        segmentation=segmentation, head_hidden=config.model.head_hidden or None,
                        seg_head=dict(config.model.seg_head))


def make_convnext2d(config: ml_collections.ConfigDict, num_classes: int) -> ConvNeXt:
  """The 2-D one-channel ConvNeXt classifier of the ``pretrain2d`` stage."""
  return ConvNeXt(**backbone_kwargs(config, spatial_dims=2), num_classes=num_classes,
                  head_hidden=config.model.head_hidden or None)


def init_params(model, config: ml_collections.ConfigDict, input_size: int,
                spatial_dims: int = 3):
  """Fresh parameters of ``model`` for ``(1, S, ..., S, 1)`` inputs, from ``config.seed``."""
  shape = (1,) + (input_size,) * spatial_dims + (1,)
  return jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros(shape))["params"]


def apply_fn(model, config: ml_collections.ConfigDict, output: str | None = None,
             normalisation: tuple[float, float] | None = None) -> steps.ApplyFn:
  """``model``'s apply_fn (``covid3d.train.steps``) on inputs in [0, 1].

  The data's mean/std (``config.data``; ``normalisation`` overrides them) are
  applied on device; ``output`` picks one head's output of a ``MultitaskModel``
  (None: all outputs).
  """
  mean, std = normalisation or (config.data.mean, config.data.std)
  fn = steps.flax_apply_fn(model, mean, std)
  if output is None:
    return fn
  return lambda params, x, deterministic, rngs: fn(params, x, deterministic, rngs)[output]
