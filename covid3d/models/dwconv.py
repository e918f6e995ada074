"""Depthwise convolution backends.

Every backend computes the same function: a channels-last depthwise
cross-correlation with 'same' zero padding, exactly what
``lax.conv_general_dilated(..., feature_group_count=C)`` computes.

* ``xla``: XLA's grouped convolution. Fast on GPU/TPU where the compiler has a
  depthwise kernel; on CPU it lowers to a slow generic loop in 3-D.
* ``fft``: pointwise product in the Fourier domain. Cost does not grow with
  the kernel size, which suits 7^3 kernels.
* ``shift``: a loop (``lax.scan``) over the kernel taps adding a shifted copy
  of the input times one weight per channel: memory-bound multiply-adds.
* ``pallas``: Pallas kernels for the forward pass and both gradients
  (``covid3d.models.dwconv_pallas``): Triton on GPU; on CPU Pallas's
  interpreter, which is correct but a debugging path, not a fast one.
* ``auto``: the fastest of the others for this device, shape and dtype, measured
  once and shared by every process (``covid3d.models.dwconv_tune``); ``pallas``
  only on GPU/TPU (``auto_candidates``).

``lax_depthwise_conv`` (the ``xla`` backend) is also the reference the tests and
``python -m covid3d.bench model --dwconv-check`` compare the others with.
"""
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from covid3d.models import dwconv_tune
from covid3d.models.dwconv_pallas import depthwise_conv_pallas

IMPLS = ("xla", "fft", "shift", "pallas")


def lax_depthwise_conv(x, kernel, precision=None):
  """XLA's grouped convolution with 'same' padding (left ``(k - 1) // 2``): the definition.

  Args:
    x: ``(B, *spatial, C)``, 2 or 3 spatial axes.
    kernel: ``(*k, 1, C)``.
    precision: ``lax.Precision`` of the convolution (None: the default; a
      reference wants ``lax.Precision.HIGHEST`` on GPU/TPU).

  Returns:
    ``(B, *spatial, C)`` in ``x``'s dtype.
  """
  nd = x.ndim - 2
  spatial = "DHW"[-nd:]
  dims = lax.conv_dimension_numbers(
      x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  pad = [((k - 1) // 2, k // 2) for k in kernel.shape[:nd]]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1,) * nd, padding=pad,
      dimension_numbers=dims, feature_group_count=x.shape[-1], precision=precision)


def _fft(x, kernel):
  nd = x.ndim - 2
  ksize = kernel.shape[:nd]
  n = x.shape[1:-1]
  # Cross-correlation as a circular correlation of the input padded by the
  # kernel's left half-width; a length of n + k - 1 keeps every output free
  # of wrap-around.
  length = tuple(ni + ki - 1 for ni, ki in zip(n, ksize, strict=True))
  axes = tuple(range(1, nd + 1))
  pad = [(0, 0)] + [((k - 1) // 2, l - ni - (k - 1) // 2)
                    for k, l, ni in zip(ksize, length, n, strict=True)] + [(0, 0)]
  xf = jnp.fft.rfftn(jnp.pad(x.astype(jnp.float32), pad), s=length, axes=axes)
  w = kernel[..., 0, :].astype(jnp.float32)
  wf = jnp.fft.rfftn(w, s=length, axes=tuple(range(nd)))
  y = jnp.fft.irfftn(xf * jnp.conj(wf), s=length, axes=axes)
  y = y[(slice(None),) + tuple(slice(0, ni) for ni in n)]
  return y.astype(x.dtype)


def _shift(x, kernel):
  # A scan over the kernel taps keeps the program small (343 taps at 7^3);
  # each step adds one shifted window times its per-channel weight.
  nd = x.ndim - 2
  ksize = kernel.shape[:nd]
  pad = [(0, 0)] + [((k - 1) // 2, k // 2) for k in ksize] + [(0, 0)]
  xp = jnp.pad(x, pad)
  w = kernel[..., 0, :].reshape(-1, x.shape[-1])
  taps = jnp.asarray(list(itertools.product(*(range(k) for k in ksize))), jnp.int32)

  def add_tap(acc, tap_and_weight):
    tap, weight = tap_and_weight
    start = (0,) + tuple(tap[i] for i in range(nd)) + (0,)
    return acc + lax.dynamic_slice(xp, start, x.shape) * weight, None

  # Rematerialised taps: the backward pass re-slices the padded input instead
  # of keeping one window per tap (343 copies of the activation at 7^3).
  out, _ = lax.scan(jax.checkpoint(add_tap), jnp.zeros_like(x), (taps, w))
  return out


def _pallas(x, kernel):
  return depthwise_conv_pallas(x, kernel)


_BACKENDS = {"xla": lax_depthwise_conv, "fft": _fft, "shift": _shift, "pallas": _pallas}


def auto_candidates(platform=None):
  """The backends ``auto`` times on ``platform`` (default: the default backend's).

  ``pallas`` only on GPU/TPU. On CPU Pallas runs in its interpreter, a
  debugging path (a while loop over the grid whose body is the kernel as
  ordinary XLA ops, with a copy of every block): it compiles slowly, it lost
  to ``fft`` in this project's CPU measurements of ConvNeXt-nano, and its
  speed there says nothing about the compiled kernel; timing it would only
  lengthen the first use of every shape.
  """
  platform = platform or jax.default_backend()
  return tuple(i for i in IMPLS if i != "pallas" or platform != "cpu")


def depthwise_conv(x, kernel, bias=None, impl="xla"):
  """Channels-last depthwise convolution with 'same' padding.

  Args:
    x: ``(B, *spatial, C)`` input, 2 or 3 spatial axes.
    kernel: ``(*k, 1, C)`` weights in Flax layout (one filter per channel).
    bias: ``(C,)`` or None.
    impl: one of ``xla``, ``fft``, ``shift``, ``pallas`` or ``auto``.

  Returns:
    ``(B, *spatial, C)``, the cross-correlation ``lax.conv`` computes.
  """
  if kernel.ndim != x.ndim or kernel.shape[-2] != 1 or kernel.shape[-1] != x.shape[-1]:
    raise ValueError(
        f"depthwise_conv: kernel {kernel.shape} does not match input {x.shape}; "
        f"expected (*k, 1, {x.shape[-1]}) with {x.ndim - 2} spatial axes")
  if impl == "auto":
    impl = choose_impl(x.shape, kernel.shape, x.dtype)
  if impl not in _BACKENDS:
    raise ValueError(f"dwconv impl {impl!r} is not one of {IMPLS + ('auto',)}")
  y = _BACKENDS[impl](x, kernel)
  if bias is not None:
    y = y + bias
  return y


def choose_impl(x_shape: Sequence[int], k_shape: Sequence[int], dtype=jnp.float32) -> str:
  """The fastest backend for this shape on the current device, by measurement
  (``covid3d.models.dwconv_tune``); the same on every process."""
  candidates = auto_candidates(jax.devices()[0].platform)
  return dwconv_tune.choose({i: _BACKENDS[i] for i in candidates}, x_shape, k_shape, dtype)


def recorded_choices() -> dict:
  """``{cache key: backend}``: what ``auto`` reuses on this device now (this process's table)."""
  return dwconv_tune.recorded(auto_candidates(jax.devices()[0].platform))
