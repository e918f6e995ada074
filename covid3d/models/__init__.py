"""Models: ConvNeXt (2-D and 3-D), depthwise-conv backends, heads, multitask model."""
from covid3d.models.convnext import ConvNeXt
from covid3d.models.dwconv import IMPLS as DWCONV_IMPLS
from covid3d.models.dwconv import choose_impl, depthwise_conv
from covid3d.models.heads import ClassificationHead, UperNetHead
from covid3d.models.multitask import MultitaskModel
from covid3d.models.variants import VARIANTS, variant

__all__ = ["ConvNeXt", "VARIANTS", "variant", "depthwise_conv", "choose_impl", "DWCONV_IMPLS",
           "ClassificationHead", "UperNetHead", "MultitaskModel"]
