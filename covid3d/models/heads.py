"""Classification and segmentation heads on ConvNeXt features (channels-last)."""
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from covid3d.models.layers import INIT, layer_norm
from covid3d.models.ops import adaptive_avg_pool, resize_linear

UPERNET_STYLES = ("upernext", "upernet")


class ClassificationHead(nn.Module):
  """Global average pool -> LayerNorm -> [Linear hidden -> ReLU] -> Linear.

  ``hidden`` set reproduces the authors' extra "pre_head" layer; None is the
  official ConvNeXt head. Input ``(B, *spatial, C)``; output float32 logits
  ``(B, num_classes)``.
  """
  num_classes: int
  hidden: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    x = layer_norm(self.dtype, "norm")(x)
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=INIT, name="pre_head")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=INIT, name="fc")(x)
    return x.astype(jnp.float32)


class ConvNormReLU(nn.Module):
  """``kernel^d`` conv ('same' padding) -> LayerNorm -> ReLU."""
  features: int
  kernel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    x = nn.Conv(self.features, (self.kernel,) * nd, padding="SAME", dtype=self.dtype,
                kernel_init=INIT, name="conv")(x)
    return nn.relu(layer_norm(self.dtype, "norm")(x))


class UperNetHead(nn.Module):
  """Segmentation head producing logits at the input resolution.

  ``style='upernext'`` (default) is the authors' head: per stage a 1^d conv to
  ``channels`` + LayerNorm + ReLU, resized to the stage-1 grid and
  concatenated, then three ``fuse_kernel``^d convs (the first two with
  LayerNorm + ReLU) and a x4 linear upsampling.
  ``style='upernet'`` is the classic UperNet (Xiao et al. 2018): pyramid
  pooling on the last stage, an FPN top-down path with 3^d convs, the levels
  fused at stage-1 resolution, a 1^d classifier. LayerNorm replaces
  BatchNorm in both, so the model keeps no batch statistics.

  Attributes:
    num_classes: output channels (1: one binary lesion logit).
    style: ``upernext`` or ``upernet``.
    channels: width of the head (authors: 16).
    fuse_kernel: kernel of the fusion convs (authors: 7; classic: 3).
    pool_scales: pyramid pooling output sizes (classic style only).
    align_corners: linear resizing convention (authors' final upsampling: True).
    prior: if set, the classifier bias starts at ``logit(prior)``, so the
      initial lesion probability is ``prior`` everywhere (Lin et al. 2017,
      focal loss): training then skips its first phase of unlearning a 0.5
      foreground probability on a mostly-background volume. None: bias 0.
  """
  num_classes: int = 1
  style: str = "upernext"
  channels: int = 16
  fuse_kernel: int = 7
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  align_corners: bool = True
  prior: Optional[float] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, out_shape=None):
    """Args: features, the four ``(B, *spatial_i, C_i)`` stage outputs;
    out_shape: spatial output size (default: 4x the first stage's).
    Returns ``(B, *out_shape, num_classes)`` float32 logits."""
    if self.style not in UPERNET_STYLES:
      raise ValueError(f"UperNetHead style {self.style!r} is not one of {UPERNET_STYLES}")
    base = features[0].shape[1:-1]
    if out_shape is None:
      out_shape = tuple(4 * s for s in base)
    fuse = self._upernext if self.style == "upernext" else self._upernet
    x = fuse(features, base)
    x = resize_linear(x, tuple(out_shape), self.align_corners)
    return x.astype(jnp.float32)

  def _resize(self, x, shape):
    return resize_linear(x, tuple(shape), self.align_corners)

  def _upernext(self, features, base):
    levels = [self._resize(ConvNormReLU(self.channels, 1, self.dtype, name=f"lateral{i}")(f), base)
              for i, f in enumerate(features)]
    x = jnp.concatenate(levels, axis=-1)
    x = ConvNormReLU(self.channels, self.fuse_kernel, self.dtype, name="fuse0")(x)
    x = ConvNormReLU(self.channels, self.fuse_kernel, self.dtype, name="fuse1")(x)
    nd = x.ndim - 2
    return nn.Conv(self.num_classes, (self.fuse_kernel,) * nd, padding="SAME", dtype=self.dtype,
                   kernel_init=INIT, bias_init=self._bias_init(), name="classifier")(x)

  def _bias_init(self):
    if self.prior is None:
      return nn.initializers.zeros
    if not 0.0 < self.prior < 1.0:
      raise ValueError(f"UperNetHead prior must be in (0, 1), got {self.prior}")
    return nn.initializers.constant(math.log(self.prior / (1.0 - self.prior)))

  def _upernet(self, features, base):
    top = features[-1]
    top_shape = top.shape[1:-1]
    pooled = [self._resize(ConvNormReLU(self.channels, 1, self.dtype, name=f"ppm{s}")(
        adaptive_avg_pool(top, (s,) * len(top_shape))), top_shape) for s in self.pool_scales]
    psp = ConvNormReLU(self.channels, self.fuse_kernel, self.dtype, name="ppm_bottleneck")(
        jnp.concatenate([top] + pooled, axis=-1))
    laterals = [ConvNormReLU(self.channels, 1, self.dtype, name=f"lateral{i}")(f)
                for i, f in enumerate(features[:-1])] + [psp]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[1:-1])
    outs = [ConvNormReLU(self.channels, self.fuse_kernel, self.dtype, name=f"fpn{i}")(lat)
            for i, lat in enumerate(laterals[:-1])] + [psp]
    x = jnp.concatenate([self._resize(o, base) for o in outs], axis=-1)
    x = ConvNormReLU(self.channels, self.fuse_kernel, self.dtype, name="fpn_bottleneck")(x)
    nd = x.ndim - 2
    return nn.Conv(self.num_classes, (1,) * nd, dtype=self.dtype, kernel_init=INIT,
                   bias_init=self._bias_init(), name="classifier")(x)
