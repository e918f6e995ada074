"""Prediction of a large cube in overlapping windows of the model's input size."""
import itertools

import jax.numpy as jnp


def window_starts(size: int, window: int, overlap: float):
  """Start offsets of windows covering ``[0, size)`` with at least ``overlap`` overlap."""
  if window >= size:
    return [0]
  stride = max(1, int(window * (1 - overlap)))
  starts = list(range(0, size - window, stride))
  return starts + [size - window]


def sliding_window(forward, x, window: int, overlap: float):
  """Mean of ``forward`` over overlapping cubic windows of ``x`` ``(B, S, S, S, C)``.

  ``forward`` maps ``(B, w, w, w, C)`` to one channel ``(B, w, w, w, 1)``; windows
  of side ``window`` overlap by at least ``overlap`` (a fraction); each voxel gets
  the mean over the windows that hold it, float32 ``(B, S, S, S, 1)``.
  """
  size = x.shape[1]
  total = jnp.zeros(x.shape[:-1] + (1,), jnp.float32)
  count = jnp.zeros((1, size, size, size, 1), jnp.float32)
  starts = window_starts(size, window, overlap)
  for d, h, w in itertools.product(starts, starts, starts):
    sl = (slice(None), slice(d, d + window), slice(h, h + window), slice(w, w + window))
    total = total.at[sl].add(forward(x[sl]))
    count = count.at[sl].add(1.0)
  return total / count
