"""Shared ConvNeXt backbone with named classification heads and a segmentation head."""
from typing import Any, Mapping, Optional

import flax.linen as nn

from covid3d.models.convnext import ConvNeXt
from covid3d.models.heads import ClassificationHead, UperNetHead


class MultitaskModel(nn.Module):
  """Backbone + one classification head per task + optional segmentation head.

  Parameter tree: ``backbone`` (a ``ConvNeXt`` without head), ``head_<name>``
  per task, ``seg_head`` (an ``UperNetHead``).

  Attributes:
    backbone: keyword arguments of ``ConvNeXt`` (``num_classes`` must be unset).
    heads: task name -> number of classes, e.g. ``{'severity': 4, 'stoic': 2}``.
    segmentation: add the segmentation head under the key ``'segmentation'``.
    head_hidden: the authors' pre_head width for every classification head.
    seg_head: keyword arguments of ``UperNetHead``.
  """
  backbone: Mapping[str, Any]
  heads: Mapping[str, int]
  segmentation: bool = False
  head_hidden: Optional[int] = None
  seg_head: Mapping[str, Any] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """Args: x ``(B, *spatial, C)``. Returns a dict: task name -> ``(B, classes)``
    logits, and ``'segmentation'`` -> ``(B, *spatial, seg classes)`` logits."""
    if self.backbone.get("num_classes") is not None:
      raise ValueError("MultitaskModel: the backbone must be features-only (num_classes=None)")
    if "segmentation" in self.heads:
      raise ValueError("MultitaskModel: 'segmentation' is reserved for the segmentation head")
    backbone = ConvNeXt(**self.backbone, name="backbone")
    features = backbone(x, deterministic)
    out = {name: ClassificationHead(n, self.head_hidden, backbone.dtype,
                                    name=f"head_{name}")(features[-1])
           for name, n in self.heads.items()}
    if self.segmentation:
      out["segmentation"] = UperNetHead(**dict(self.seg_head or {}), dtype=backbone.dtype,
                                        name="seg_head")(features, x.shape[1:-1])
    return out
