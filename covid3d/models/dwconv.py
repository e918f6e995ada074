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
* ``auto``: times the other backends once per (device kind, shape, dtype) on
  the current device and uses the fastest (``pallas`` only on GPU/TPU, see
  ``auto_candidates``). The decision is memoised in this process and written
  to ``dwconv_auto.json`` under the cache root (``covid3d.cachedir``) so later
  processes reuse the measurement. With several processes (a pod) process 0
  decides, from its own table or measurement, and the others take its
  answer through JAX's distributed key-value store: every host compiles the
  same program whatever its own cache holds. ``decisions()`` lists the
  choices this process made or received (a stage records them in its
  ``config.json`` as ``dwconv_auto``).
"""
import itertools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jax._src import distributed

from covid3d import cachedir
from covid3d.models.dwconv_pallas import depthwise_conv_pallas
from covid3d.timing import median_seconds

IMPLS = ("xla", "fft", "shift", "pallas")


def _xla(x, kernel):
  nd = x.ndim - 2
  spatial = "DHW"[-nd:]
  dims = lax.conv_dimension_numbers(
      x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  pad = [((k - 1) // 2, k // 2) for k in kernel.shape[:nd]]
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1,) * nd, padding=pad,
      dimension_numbers=dims, feature_group_count=x.shape[-1])


def _fft(x, kernel):
  nd = x.ndim - 2
  ksize = kernel.shape[:nd]
  n = x.shape[1:-1]
  # Cross-correlation as a circular correlation of the input padded by the
  # kernel's left half-width; a length of n + k - 1 keeps every output free
  # of wrap-around.
  length = tuple(ni + ki - 1 for ni, ki in zip(n, ksize))
  axes = tuple(range(1, nd + 1))
  pad = [(0, 0)] + [((k - 1) // 2, l - ni - (k - 1) // 2)
                    for k, l, ni in zip(ksize, length, n)] + [(0, 0)]
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


_BACKENDS = {"xla": _xla, "fft": _fft, "shift": _shift, "pallas": _pallas}


def auto_candidates(platform=None):
  """The backends ``auto`` times on ``platform`` (default: the default backend's).

  ``pallas`` only on GPU/TPU. On CPU Pallas runs in its interpreter, a
  debugging path (a while loop over the grid whose body is the kernel as
  ordinary XLA ops, with a copy of every block): it compiles slowly, it lost
  to ``fft`` in this project's CPU measurements (ConvNeXt-nano forward+backward
  at 64^3: 148 ms against 73 ms with ``fft``), and its speed there says
  nothing about the compiled kernel; timing it would only lengthen the first
  use of every shape.
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


def _cache_key(x_shape, k_shape, dtype):
  # The candidate list is part of the key: a choice made before a backend
  # existed (or was eligible) is measured again, not reused.
  dev = jax.devices()[0]
  return (f"{dev.platform}|{dev.device_kind}|{tuple(x_shape)}|{tuple(k_shape)}|"
          f"{jnp.dtype(dtype).name}|{','.join(auto_candidates(dev.platform))}")


def time_impl(impl, x_shape, k_shape, dtype=jnp.float32, reps=3, grad=True):
  """Median seconds of one jitted call (forward, or forward+backward)."""
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape, dtype)
  kern = jax.random.normal(kk, k_shape, dtype)
  fn = _BACKENDS[impl]
  if grad:
    fn = jax.grad(lambda a, b: jnp.sum(_BACKENDS[impl](a, b).astype(jnp.float32) ** 2), (0, 1))
  return median_seconds(jax.jit(fn), x, kern, reps=reps)


# Seconds the other processes wait for process 0's choice (it may be timing
# four backends, each compiled for the first time).
SHARED_TIMEOUT_S = 1800


_DECIDED = {}   # cache key -> backend: the choices of this process (a memo)


def _choose_cached(key, x_shape, k_shape, dtype_name):
  if key not in _DECIDED:
    _DECIDED[key] = _choose_shared(key, x_shape, k_shape, dtype_name)
  return _DECIDED[key]


def _choose_shared(key, x_shape, k_shape, dtype_name):
  """Process 0's choice on every process (see the module docstring)."""
  if jax.process_count() == 1:
    return _choose_here(key, x_shape, k_shape, dtype_name)
  client, name = distributed.global_state.client, f"covid3d/dwconv_auto/{key}"
  if jax.process_index() == 0:
    best = _choose_here(key, x_shape, k_shape, dtype_name)
    client.key_value_set(name, best, allow_overwrite=True)
    return best
  return client.blocking_key_value_get(name, SHARED_TIMEOUT_S * 1000)


def decisions() -> dict:
  """``{cache key: backend}`` of every ``auto`` choice made in this process so far."""
  return dict(_DECIDED)


def _choose_here(key, x_shape, k_shape, dtype_name):
  """This process's choice: from the table under the cache root, else measured."""
  path = cachedir.path("dwconv_auto.json")
  table = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        table = json.load(f)
    except (OSError, ValueError):
      table = {}
  if key in table:
    return table[key]["best"]
  times, errors = {}, {}
  with jax.ensure_compile_time_eval():
    for impl in auto_candidates(jax.devices()[0].platform):
      try:
        times[impl] = time_impl(impl, x_shape, k_shape, jnp.dtype(dtype_name))
      except Exception as e:  # pylint: disable=broad-except
        if impl != "pallas":
          raise
        # A Pallas kernel this device's compiler rejects (e.g. Mosaic TPU's
        # layout limits) is not a candidate; the others still are.
        errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  best = min(times, key=times.get)
  table[key] = {"best": best, "seconds": times}
  if errors:
    table[key]["errors"] = errors
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    pass  # A read-only home still gets the in-process decision.
  return best


def choose_impl(x_shape: Sequence[int], k_shape: Sequence[int], dtype=jnp.float32) -> str:
  """The fastest backend for this shape on the current device, by measurement."""
  x_shape, k_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in k_shape)
  dtype_name = jnp.dtype(dtype).name
  return _choose_cached(_cache_key(x_shape, k_shape, dtype_name), x_shape, k_shape, dtype_name)
