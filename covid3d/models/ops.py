"""Separable resampling operators for channels-last feature maps.

Both are written as one small matrix per spatial axis applied with einsum, so
they run as matrix products on any accelerator and behave like PyTorch's
``F.interpolate(mode='(bi|tri)linear')`` and ``F.adaptive_avg_pool``.
"""
import numpy as np
import jax.numpy as jnp


def linear_resize_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """``(n_out, n_in)`` matrix of 1-D linear interpolation weights.

  ``align_corners=True`` maps the first and last samples onto each other
  (PyTorch's ``align_corners=True``); ``False`` uses half-pixel centres
  (PyTorch's default and ``jax.image.resize``).
  """
  out = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
  else:
    src = np.clip((out + 0.5) * (n_in / n_out) - 0.5, 0.0, None)
  lo = np.minimum(np.floor(src).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``(n_out, n_in)`` averaging matrix of PyTorch's adaptive average pooling."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _apply_per_axis(x, matrices):
  """Applies one matrix per spatial axis of a ``(B, *spatial, C)`` array."""
  nd = x.ndim - 2
  letters = "dhw"[-nd:]
  for axis, m in enumerate(matrices):
    if m is None:
      continue
    dst = letters[:axis] + "z" + letters[axis + 1:]
    spec = f"z{letters[axis]},b{letters}c->b{dst}c"
    x = jnp.einsum(spec, jnp.asarray(m, x.dtype), x)
  return x


def resize_linear(x, shape, align_corners=False):
  """(Bi/tri)linear resize of ``(B, *spatial, C)`` to ``(B, *shape, C)``."""
  mats = [None if n_in == n_out else linear_resize_matrix(n_in, n_out, align_corners)
          for n_in, n_out in zip(x.shape[1:-1], shape, strict=True)]
  return _apply_per_axis(x, mats)


def adaptive_avg_pool(x, shape):
  """Adaptive average pooling of ``(B, *spatial, C)`` to ``(B, *shape, C)``."""
  mats = [adaptive_pool_matrix(n_in, n_out)
          for n_in, n_out in zip(x.shape[1:-1], shape, strict=True)]
  return _apply_per_axis(x, mats)
