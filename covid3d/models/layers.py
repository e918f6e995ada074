"""Initialisers and normalisation shared by the backbone and the heads."""
import flax.linen as nn

# ConvNeXt's weight init (trunc_normal std 0.02) and LayerNorm epsilon.
INIT = nn.initializers.truncated_normal(stddev=0.02)
LN_EPS = 1e-6


def layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)
