"""Depthwise convolution as Pallas kernels (``depthwise_conv(..., impl="pallas")``).

Computes what ``lax.conv_general_dilated(..., feature_group_count=C)`` computes:
a channels-last depthwise cross-correlation with 'same' zero padding (left pad
``(k - 1) // 2``), 2-D or 3-D, any kernel size (odd sizes are the ones used),
float32 or bfloat16 inputs accumulated in float32. Gradients come from a
``jax.custom_vjp`` whose two backward products are Pallas kernels as well:

* input gradient: the same correlation kernel run on the output gradient with
  the spatially flipped kernel (left pad ``k // 2``);
* kernel gradient: ``dw[t, c] = sum_{b, i} dy[b, i, c] * x_pad[b, i + t, c]``,
  a reduction over the batch and every position. The positions are tiled: one
  program per (example, block of the outer spatial axis, group of H tiles,
  block of channels) writes its own partial sums ``(k_d, k_h, k_w, block_c)``
  (H is cut into as many groups as it takes to give the GPU about a thousand
  programs), and one XLA reduction sums the partials of all programs. No
  program waits on another, so nothing serialises over the batch or space.

Layout and blocking. A 2-D input ``(B, H, W, C)`` runs as 3-D with a depth of
one. The wrapper zero-pads the input once: the halo of the kernel on every
spatial axis, the spatial sizes up to whole blocks, the channels up to whole
channel blocks (so 5 or 20 channels work with any block). The grid is
``(batch, outer-axis blocks, H blocks, channel blocks)``; an input block is
``(block_d + k_d - 1, block_h + k_h - 1, W + k_w - 1, block_c)``, indexed by
element offset (``pl.Element``) so neighbouring blocks overlap by the halo,
and the kernel adds the ``k_d * k_h * k_w`` shifted windows times one weight
per channel, looping over ``(k_d, k_h)`` with ``lax.fori_loop`` and unrolling
``k_w``. The outputs are sliced back to the input's shape.

Where it runs:

* CPU: only Pallas's interpreter (``interpret=True``), chosen automatically
  when the default backend is CPU. It is correct but a debugging path (a loop
  over the grid with a copy of every block, slow to compile); it is meant for
  tests, not speed, and ``auto`` does not time it there.
* GPU: the Triton lowering, selected explicitly with
  ``jax.experimental.pallas.triton.CompilerParams`` (jax 0.10 lowers a plain
  ``pallas_call`` with Mosaic GPU by default). Triton needs every loaded or
  stored array to have a power-of-two size and has no bounds masking, so on
  GPU the channel block, ``block_d``, ``block_h`` and the padded W are powers
  of two and the padding covers every access. A Mosaic GPU version (warpgroup
  tiles fed by TMA into shared memory) is not written: ``pallas_call`` for
  Mosaic GPU is deprecated in jax 0.10 and such a kernel could not be
  developed without a GPU. Not yet run on a GPU: ``covid3d/bench/gpu_check.sh``
  checks it against ``lax`` and times it.
* TPU: the same kernel goes to Mosaic TPU without compiler parameters (channel
  blocks of 128 or all channels, the last two block dimensions whole). It has
  never been compiled on a TPU; Mosaic's limits on unaligned sublane slices
  (the ``k_w`` shifts along W) may reject it. ``auto`` times it only when it
  compiles and falls back to the other backends otherwise.
"""
import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Elements of one output tile (float32 accumulator) per program.
_GPU_TILE = 4096          # registers of 4 warps: 32 floats per thread
_INTERPRET_TILE = 1 << 18  # the interpreter: fewer, larger grid steps


@dataclasses.dataclass(frozen=True)
class Options:
  """Static settings of one call (hashable: a ``custom_vjp`` non-diff argument).

  ``None`` fields are chosen from the platform; tests set them to exercise
  blocks that do not divide the array.
  """
  interpret: bool
  pow2: bool                  # power-of-two tiles (the Triton lowering needs them)
  platform: str               # "cpu", "gpu" or "tpu"
  block_c: Optional[int] = None
  block_d: Optional[int] = None
  block_h: Optional[int] = None
  # Kernel gradient: split H into groups of row tiles until the grid has at
  # least this many programs (each writes its own partial sums).
  kgrad_programs: Optional[int] = None
  num_warps: int = 4


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Plan:
  tc: int   # channel block
  td: int   # outer (depth) block
  th: int   # H block
  wq: int   # W of the computed output (W, or its next power of two)
  nc: int
  nd: int
  nh: int   # H blocks (a multiple of hg)
  hg: int   # H blocks per kernel-gradient program; nh // hg groups

  @property
  def cp(self):
    return self.nc * self.tc

  @property
  def dq(self):
    return self.nd * self.td

  @property
  def hq(self):
    return self.nh * self.th


def _plan(shape5, opts: Options) -> _Plan:
  _, d, h, w, c = shape5
  if opts.pow2:
    wq = _next_pow2(w)
    tc = opts.block_c or max(1, min(32, _next_pow2(c), _GPU_TILE // wq))
    budget = _GPU_TILE
  else:
    wq = w
    if opts.platform == "tpu":  # lane dimension: 128 or all channels
      tc = opts.block_c or (c if c <= 256 else 128)
    else:
      tc = opts.block_c or min(c, 128)
    budget = _INTERPRET_TILE if opts.interpret else _GPU_TILE
  cap = _next_pow2 if opts.pow2 else (lambda n: n)
  th = opts.block_h or min(cap(h), max(1, budget // (wq * tc)))
  td = opts.block_d or min(cap(d), max(1, budget // (th * wq * tc)))
  if not opts.pow2:  # the same number of blocks, as even as they go (less padding)
    th = opts.block_h or math.ceil(h / math.ceil(h / th))
    td = opts.block_d or math.ceil(d / math.ceil(d / td))
  if opts.pow2 and any(v & (v - 1) for v in (tc, th, td)):
    raise ValueError(f"pallas dwconv: power-of-two blocks needed here, got c={tc} d={td} h={th}")
  nc, nd, nh = math.ceil(c / tc), math.ceil(d / td), math.ceil(h / th)
  # Kernel-gradient programs: (batch, depth blocks, H groups, channel blocks).
  target = opts.kgrad_programs or (1 if opts.interpret else 1024)
  groups = min(nh, max(1, math.ceil(target / (shape5[0] * nd * nc))))
  hg = math.ceil(nh / groups)
  nh = hg * math.ceil(nh / hg)
  return _Plan(tc, td, th, wq, nc, nd, nh, hg)


def _call_kwargs(opts: Options):
  kw = {"interpret": opts.interpret}
  if not opts.interpret and opts.platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
    kw["compiler_params"] = pltriton.CompilerParams(num_warps=opts.num_warps, num_stages=1)
  return kw


def _pad_input(x5, ksize, left, plan: _Plan):
  """Zero halo ``left`` / ``k - 1 - left`` plus the padding up to whole blocks."""
  sizes = (plan.dq, plan.hq, plan.wq)
  pads = [(0, 0)]
  for n, k, lo, q in zip(x5.shape[1:4], ksize, left, sizes, strict=True):
    pads.append((lo, q + k - 1 - lo - n))
  pads.append((0, plan.cp - x5.shape[-1]))
  return jnp.pad(x5, pads)


def _pad_output_like(y5, plan: _Plan):
  """Zero padding of an output-shaped array up to whole blocks (the output gradient)."""
  _, d, h, w, c = y5.shape
  return jnp.pad(y5, [(0, 0), (0, plan.dq - d), (0, plan.hq - h), (0, plan.wq - w),
                      (0, plan.cp - c)])


# --------------------------------------------------------------- the kernels

def _tap_loop(ksize, unroll_w, body, init):
  """``body(kd, kh, kw, carry)`` over every tap: a loop over (kd, kh) with kw unrolled
  (``unroll_w``, static shifts along W for the compiler), or one loop over all taps
  (a smaller program, which the interpreter compiles faster)."""
  kd_n, kh_n, kw_n = ksize
  if unroll_w:
    def rows(t, carry):
      for kw in range(kw_n):
        carry = body(t // kh_n, t % kh_n, kw, carry)
      return carry
    return lax.fori_loop(0, kd_n * kh_n, rows, init)

  def one(t, carry):
    return body(t // (kh_n * kw_n), (t // kw_n) % kh_n, t % kw_n, carry)
  return lax.fori_loop(0, kd_n * kh_n * kw_n, one, init)


def _correlate_kernel(x_ref, w_ref, o_ref, *, ksize, td, th, wq, unroll_w):
  """One output tile ``(td, th, wq, tc)``: the sum over taps of shifted windows times weights."""
  tc = o_ref.shape[-1]

  def tap(kd, kh, kw, acc):
    window = x_ref[pl.ds(kd, td), pl.ds(kh, th), pl.ds(kw, wq), :].astype(jnp.float32)
    return acc + window * w_ref[kd, kh, kw, :].astype(jnp.float32)

  acc = _tap_loop(ksize, unroll_w, tap, jnp.zeros((td, th, wq, tc), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _kernel_grad_kernel(x_ref, dy_ref, o_ref, *, ksize, td, th, hg, wq, unroll_w):
  """Partial kernel gradient of one (example, depth block, H group, channel block).

  ``x_ref``: ``(td + k_d - 1, hg * th + k_h - 1, wq + k_w - 1, tc)`` padded input;
  ``dy_ref``: ``(td, hg * th, wq, tc)``; ``o_ref``: ``(k_d, k_h, k_w, tc)`` float32.
  Each tap's sum runs over the group's ``hg`` tiles of ``th`` rows (a
  register-sized tile on GPU). With ``unroll_w`` one output-gradient tile
  serves the ``k_w`` taps of a kernel row (loaded once, ``k_w`` sums carried).
  """
  kd_n, kh_n, kw_n = ksize
  tc = o_ref.shape[-1]

  def window(kd, kh, kw, r):
    return x_ref[pl.ds(kd, td), pl.ds(r * th + kh, th), pl.ds(kw, wq), :].astype(jnp.float32)

  def dy_tile(r):
    return dy_ref[:, pl.ds(r * th, th), :, :].astype(jnp.float32)

  zero = jnp.zeros((tc,), jnp.float32)
  if unroll_w:
    def kernel_row(t, carry):
      kd, kh = t // kh_n, t % kh_n

      def rows(r, sums):
        dy = dy_tile(r)
        return tuple(acc + jnp.sum(dy * window(kd, kh, kw, r), axis=(0, 1, 2))
                     for kw, acc in enumerate(sums))

      sums = lax.fori_loop(0, hg, rows, (zero,) * kw_n)
      for kw in range(kw_n):
        o_ref[kd, kh, kw, :] = sums[kw]
      return carry

    lax.fori_loop(0, kd_n * kh_n, kernel_row, 0)
    return

  def tap(kd, kh, kw, carry):
    def rows(r, acc):
      return acc + jnp.sum(dy_tile(r) * window(kd, kh, kw, r), axis=(0, 1, 2))

    o_ref[kd, kh, kw, :] = lax.fori_loop(0, hg, rows, zero)
    return carry

  _tap_loop(ksize, False, tap, 0)


def _correlate(x5, w4, left, opts: Options):
  """``y[b, i, c] = sum_t x_pad[b, i + t, c] * w[t, c]``, x zero-padded by ``left`` before."""
  ksize = w4.shape[:3]
  plan = _plan(x5.shape, opts)
  xp = _pad_input(x5, ksize, left, plan)
  wp = jnp.pad(w4, [(0, 0)] * 3 + [(0, plan.cp - w4.shape[-1])])
  kd_n, kh_n, kw_n = ksize
  b = x5.shape[0]
  kernel = functools.partial(_correlate_kernel, ksize=ksize, td=plan.td, th=plan.th, wq=plan.wq,
                             unroll_w=opts.pow2)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, plan.dq, plan.hq, plan.wq, plan.cp), x5.dtype),
      grid=(b, plan.nd, plan.nh, plan.nc),
      in_specs=[
          pl.BlockSpec((None, pl.Element(plan.td + kd_n - 1), pl.Element(plan.th + kh_n - 1),
                        plan.wq + kw_n - 1, plan.tc),
                       lambda n, i, j, c: (n, i * plan.td, j * plan.th, 0, c)),
          pl.BlockSpec((kd_n, kh_n, kw_n, plan.tc), lambda n, i, j, c: (0, 0, 0, c)),
      ],
      out_specs=pl.BlockSpec((None, plan.td, plan.th, plan.wq, plan.tc),
                             lambda n, i, j, c: (n, i, j, 0, c)),
      name="dwconv_correlate",
      **_call_kwargs(opts),
  )(xp, wp)
  _, d, h, w, c = x5.shape
  return y[:, :d, :h, :w, :c]


def _kernel_grad(x5, dy5, ksize, left, opts: Options):
  """``dw[t, c] = sum_{b, i} dy[b, i, c] * x_pad[b, i + t, c]``, float32 ``(k_d, k_h, k_w, C)``."""
  plan = _plan(x5.shape, opts)
  xp = _pad_input(x5, ksize, left, plan)
  dyp = _pad_output_like(dy5, plan)
  kd_n, kh_n, kw_n = ksize
  b = x5.shape[0]
  rows = plan.hg * plan.th  # H rows per program
  groups = plan.nh // plan.hg
  kernel = functools.partial(_kernel_grad_kernel, ksize=ksize, td=plan.td, th=plan.th,
                             hg=plan.hg, wq=plan.wq, unroll_w=opts.pow2)
  partial = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, plan.nd, groups, kd_n, kh_n, kw_n, plan.cp),
                                     jnp.float32),
      grid=(b, plan.nd, groups, plan.nc),
      in_specs=[
          pl.BlockSpec((None, pl.Element(plan.td + kd_n - 1), pl.Element(rows + kh_n - 1),
                        plan.wq + kw_n - 1, plan.tc),
                       lambda n, i, g, c: (n, i * plan.td, g * rows, 0, c)),
          pl.BlockSpec((None, plan.td, rows, plan.wq, plan.tc),
                       lambda n, i, g, c: (n, i, g, 0, c)),
      ],
      out_specs=pl.BlockSpec((None, None, None, kd_n, kh_n, kw_n, plan.tc),
                             lambda n, i, g, c: (n, i, g, 0, 0, 0, c)),
      name="dwconv_kernel_grad",
      **_call_kwargs(opts),
  )(xp, dyp)
  # The reduction of the per-program partial sums: (B, D blocks, H groups, taps, C) -> (taps, C).
  return jnp.sum(partial, axis=(0, 1, 2))[..., :x5.shape[-1]]


def _left(ksize):
  return tuple((k - 1) // 2 for k in ksize)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dwconv5(x5, w4, opts):
  return _correlate(x5, w4, _left(w4.shape[:3]), opts)


def _dwconv5_fwd(x5, w4, opts):
  return _dwconv5(x5, w4, opts), (x5, w4)


def _dwconv5_bwd(opts, residuals, dy):
  x5, w4 = residuals
  ksize = w4.shape[:3]
  left = _left(ksize)
  # dx[j] = sum_t dy[j - t + left] w[t]: the flipped kernel with the opposite halo.
  right = tuple(k - 1 - lo for k, lo in zip(ksize, left, strict=True))
  dx = _correlate(dy.astype(x5.dtype), w4[::-1, ::-1, ::-1], right, opts)
  dw = _kernel_grad(x5, dy.astype(x5.dtype), ksize, left, opts)
  return dx, dw.astype(w4.dtype)


_dwconv5.defvjp(_dwconv5_fwd, _dwconv5_bwd)


def default_options(**overrides) -> Options:
  """Options for the default backend: the interpreter on CPU, Triton tiles on GPU."""
  platform = jax.default_backend()
  platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
  fields = {"interpret": platform == "cpu", "pow2": platform == "gpu", "platform": platform}
  fields.update({k: v for k, v in overrides.items() if v is not None})
  return Options(**fields)


def depthwise_conv_pallas(x, kernel, *, block_c=None, block_d=None, block_h=None,
                          interpret=None, pow2=None, kgrad_programs=None):
  """Channels-last depthwise 'same' cross-correlation with Pallas kernels.

  Args:
    x: ``(B, *spatial, C)``, 2 or 3 spatial axes, float32 or bfloat16.
    kernel: ``(*k, 1, C)`` (Flax layout).
    block_c, block_d, block_h: block sizes (channels, outer spatial axis, H in
      3-D); None picks them for the platform.
    interpret: run Pallas's interpreter (default: when the default backend is CPU).
    pow2: power-of-two tiles as Triton needs (default: on GPU); lets a CPU test
      run the GPU's blocking in the interpreter.
    kgrad_programs: least number of kernel-gradient programs (H is split into
      groups of row tiles to reach it; default 1024 compiled, 1 interpreted).

  Returns:
    ``(B, *spatial, C)`` in ``x.dtype``, accumulated in float32.
  """
  nd = x.ndim - 2
  if nd not in (2, 3) or kernel.shape != kernel.shape[:nd] + (1, x.shape[-1]):
    raise ValueError(f"dwconv pallas: kernel {kernel.shape} does not fit input {x.shape}")
  opts = default_options(interpret=interpret, pow2=pow2, block_c=block_c, block_d=block_d,
                         block_h=block_h, kgrad_programs=kgrad_programs)
  w = kernel[..., 0, :]
  if nd == 2:
    if block_h is None and block_d is not None:
      # In 2-D the outer axis is H: the depth axis is a dummy of size one.
      opts = dataclasses.replace(opts, block_h=block_d, block_d=None)
    x5, w4 = x[:, None], w[None]
  else:
    x5, w4 = x, w
  y = _dwconv5(x5, w4, opts)
  return y[:, 0] if nd == 2 else y
