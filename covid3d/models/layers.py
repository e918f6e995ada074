"""Initialisers and normalisation shared by the backbone and the heads."""
import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-6


def trunc_normal_abs(stddev: float = 0.02, bound: float = 2.0):
  """PyTorch's ``trunc_normal_(std=stddev)``: N(0, stddev) cut at ABSOLUTE +-``bound``.

  timm/torch truncate at ``a=-2, b=2`` in value, not in standard deviations, so
  with std 0.02 the cut is at 100 sigma and the draw is, in effect, N(0, 0.02).
  Flax's ``truncated_normal(0.02)`` cuts at +-2 sigma instead (std about 0.0176).
  A plain normal draw clipped to the bound gives PyTorch's distribution without
  the inverse-CDF edge case (a uniform draw of exactly -1 maps to the bound).
  """
  def init(key, shape, dtype=jnp.float32):
    x = jax.random.normal(key, shape, dtype) * jnp.asarray(stddev, dtype)
    return jnp.clip(x, -bound, bound)
  return init


# ConvNeXt's weight init (timm ``trunc_normal_(std=.02)``) and LayerNorm epsilon.
INIT = trunc_normal_abs(0.02)


def layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)
