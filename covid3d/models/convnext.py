"""ConvNeXt for 2-D images and 3-D volumes: one definition, ``spatial_dims`` 2 or 3.

Layout is channels-last: ``(B, H, W, C)`` in 2-D, ``(B, D, H, W, C)`` in 3-D.
Parameter tree (the names ``covid3d.weights`` and ``covid3d.inflation`` rely on)::

  stem/conv, stem/norm                      4^d conv stride 4, LayerNorm
  down{1,2,3}/norm, down{i}/conv            LayerNorm, 2^d conv stride 2
  stage{i}/block{j}/dwconv, norm, pwconv1, pwconv2, gamma
  head/norm, head/pre_head (optional), head/fc       only when num_classes is set

The depthwise convolutions use ``dwconv_impl="auto"`` unless told otherwise:
the fastest backend of ``covid3d.models.dwconv`` for each stage's shape on the
current device, measured on first use and remembered under the cache root.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from covid3d.models.dwconv import depthwise_conv
from covid3d.models.heads import ClassificationHead
from covid3d.models.layers import INIT, layer_norm

REMAT_MODES = ("none", "block", "stage")


class DepthwiseConv(nn.Module):
  """Depthwise ``kernel_size^d`` conv; kernel ``(*k, 1, C)`` like ``nn.Conv`` with groups=C."""
  kernel_size: int = 7
  impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nd, c = x.ndim - 2, x.shape[-1]
    kernel = self.param("kernel", INIT, (self.kernel_size,) * nd + (1, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                          bias.astype(self.dtype), self.impl)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Block(nn.Module):
  """dwconv -> LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale -> drop path -> + x."""
  dim: int
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  kernel_size: int = 7
  dwconv_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = DepthwiseConv(self.kernel_size, self.dwconv_impl, self.dtype, name="dwconv")(x)
    y = layer_norm(self.dtype, "norm")(y)
    y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=INIT, name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=INIT, name="pwconv2")(y)
    if self.layer_scale_init > 0:
      gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init),
                         (self.dim,), jnp.float32)
      y = y * gamma.astype(self.dtype)
    y = DropPath(self.drop_path)(y, deterministic)
    return x + y


class Stage(nn.Module):
  """A run of blocks at one resolution."""
  dim: int
  drop_paths: Sequence[float]
  layer_scale_init: float = 1e-6
  kernel_size: int = 7
  dwconv_impl: str = "xla"
  dtype: Any = jnp.float32
  remat_blocks: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    block = nn.remat(Block, static_argnums=(2,)) if self.remat_blocks else Block
    for j, rate in enumerate(self.drop_paths):
      x = block(self.dim, rate, self.layer_scale_init, self.kernel_size, self.dwconv_impl,
                self.dtype, name=f"block{j}")(x, deterministic)
    return x


class PatchConv(nn.Module):
  """Optional LayerNorm, then a non-overlapping ``patch^d`` conv with stride ``patch``."""
  features: int
  patch: int
  norm_first: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    if self.norm_first:
      x = layer_norm(self.dtype, "norm")(x)
    x = nn.Conv(self.features, (self.patch,) * nd, strides=(self.patch,) * nd, padding="VALID",
                dtype=self.dtype, kernel_init=INIT, name="conv")(x)
    if not self.norm_first:
      x = layer_norm(self.dtype, "norm")(x)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt (Liu et al. 2022) in 2-D or 3-D.

  Attributes:
    depths: blocks per stage.
    dims: channels per stage.
    spatial_dims: 2 (images) or 3 (volumes).
    in_chans: input channels (1 for CT).
    num_classes: None returns the four stage outputs; an int adds the
      global-pool + LayerNorm + (optional pre_head) + Linear head.
    drop_path_rate: stochastic depth of the last block; rates rise linearly
      from 0 over all blocks.
    layer_scale_init: initial value of the per-channel layer scale (0 disables it).
    head_hidden: width of the authors' extra Linear + ReLU before the classifier
      (None: the official ConvNeXt head).
    dwconv_impl: depthwise conv backend (``covid3d.models.dwconv``): ``xla``,
      ``fft``, ``shift``, ``pallas`` or ``auto`` (the default: the first use
      of each stage's shape on a device times the candidates once and keeps
      the fastest, remembered under the cache root; docs/benchmarks.md has
      the measured backends). Pass a fixed
      backend to skip the measurement, e.g. in tests that build many models.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    remat: ``none``, ``block`` or ``stage``: recompute activations in the
      backward pass (``jax.checkpoint``) per block or per stage to save memory.
    kernel_size: depthwise kernel size.
  """
  depths: Sequence[int] = (3, 3, 9, 3)
  dims: Sequence[int] = (96, 192, 384, 768)
  spatial_dims: int = 3
  in_chans: int = 1
  num_classes: Optional[int] = None
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  head_hidden: Optional[int] = None
  dwconv_impl: str = "auto"
  dtype: Any = jnp.float32
  remat: str = "none"
  kernel_size: int = 7

  def _check_input(self, x):
    nd = self.spatial_dims
    if x.ndim != nd + 2 or x.shape[-1] != self.in_chans:
      raise ValueError(
          f"ConvNeXt(spatial_dims={nd}, in_chans={self.in_chans}) expects input "
          f"(B, {', '.join('DHW'[-nd:])}, {self.in_chans}); got shape {x.shape}")
    bad = [s for s in x.shape[1:-1] if s % 32]
    if bad:
      raise ValueError("ConvNeXt needs spatial sizes divisible by 32 (total stride); "
                       f"got {x.shape[1:-1]}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat={self.remat!r} is not one of {REMAT_MODES}")
    if len(self.depths) != len(self.dims):
      raise ValueError(f"depths {self.depths} and dims {self.dims} differ in length")

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """Args: x ``(B, *spatial, in_chans)``. Returns logits ``(B, num_classes)``
    (float32) or the list of stage outputs ``(B, *spatial / 2^(i+2), dims[i])``."""
    self._check_input(x)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    stage = nn.remat(Stage, static_argnums=(2,)) if self.remat == "stage" else Stage
    x = x.astype(self.dtype)
    features = []
    start = 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
      if i == 0:
        x = PatchConv(dim, 4, norm_first=False, dtype=self.dtype, name="stem")(x)
      else:
        x = PatchConv(dim, 2, norm_first=True, dtype=self.dtype, name=f"down{i}")(x)
      x = stage(dim, tuple(rates[start:start + depth]), self.layer_scale_init, self.kernel_size,
                self.dwconv_impl, self.dtype, self.remat == "block",
                name=f"stage{i}")(x, deterministic)
      start += depth
      features.append(x)
    if self.num_classes is None:
      return features
    return ClassificationHead(self.num_classes, self.head_hidden, self.dtype, name="head")(x)
