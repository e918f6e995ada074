"""Weights trained on slice-last volumes for the project's (slice, row, column) volumes."""
from typing import Mapping, Tuple

import numpy as np

# slice_axis names -> the permutation ``p`` with covid3d volume = their volume.transpose(p).
SLICE_AXES = {"first": (0, 1, 2), "last": (2, 1, 0)}


def _axes(slice_axis) -> Tuple[int, int, int]:
  if isinstance(slice_axis, str):
    if slice_axis not in SLICE_AXES:
      raise ValueError(f"slice_axis must be one of {sorted(SLICE_AXES)} or a permutation of "
                       f"(0, 1, 2); got {slice_axis!r}")
    return SLICE_AXES[slice_axis]
  axes = tuple(int(a) for a in slice_axis)
  if sorted(axes) != [0, 1, 2]:
    raise ValueError(f"slice_axis permutation must be a permutation of (0, 1, 2); got {slice_axis}")
  return axes


def permute_kernels(params, slice_axis="last"):
  """Permutes the spatial axes of every 3-D conv kernel ``(kD, kH, kW, in, out)`` of a tree.

  Weights trained on volumes ``v`` serve volumes ``v.transpose(p)`` with the
  same outputs (spatial outputs transposed the same way) when every 3-D
  kernel is transposed by ``p`` too: the stem, downsampling and depthwise
  kernels of a ConvNeXt, and the convolutions of a segmentation head. Dense
  layers, norms and biases do not see the spatial axes. Valid for the
  project's models because their strided convs tile the input exactly (sizes
  divisible by 32), ``SAME`` padding is symmetric and the linear resizing is
  separable per axis.

  Args:
    params: a parameter tree (ConvNeXt, MultitaskModel, ...), numpy leaves.
    slice_axis: ``'first'`` (no change), ``'last'`` (``p = (2, 1, 0)``: their
      volumes ``(column, row, slice)`` as nibabel/medpy read NIfTI/MHA files,
      ours ``(slice, row, column)``), or a permutation ``p``.

  Returns:
    A new tree (the same leaves where nothing changes).
  """
  axes = _axes(slice_axis)
  if axes == (0, 1, 2):
    return params

  def visit(node):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = visit(v)
      elif k == "kernel" and np.ndim(v) == 5:
        out[k] = np.ascontiguousarray(np.transpose(np.asarray(v), axes + (3, 4)))
      elif k == "kernel" and np.ndim(v) == 4:
        raise ValueError("slice_axis applies to 3-D kernels; this tree has 2-D convolutions")
      else:
        out[k] = v
    return out

  return visit(params)

