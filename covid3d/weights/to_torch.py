"""A ``covid3d.models.ConvNeXt`` parameter tree as a PyTorch state dict (official or timm)."""
from typing import Dict, Mapping

import numpy as np

from covid3d.weights.torch_convnext import (NAMINGS, _layout, _strip_params, _to_torch,
                                            convnext_config)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def export_torch_convnext(params, naming: str = "official") -> Dict[str, np.ndarray]:
  """The PyTorch state dict (official or timm naming) of a ConvNeXt params tree.

  The inverse of ``load_torch_convnext`` (with ``in_chans=None``). Save it with
  ``safetensors.numpy.save_file(state, path)`` or ``np.savez(path, **state)``,
  or load it into a PyTorch model with ``{k: torch.from_numpy(v)}``.

  Args:
    params: ConvNeXt params tree (or ``{'params': tree}``), 2-D or 3-D.
    naming: 'official' or 'timm'.

  Returns:
    Dict torch key -> float32 numpy array in torch layout.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
  params = _strip_params(params)
  cfg = convnext_config(params)
  entries = _layout(naming, cfg["depths"], cfg["dims"], cfg["in_chans"], cfg["spatial_dims"],
                    cfg["num_classes"], cfg["head_hidden"], cfg["layer_scale_init"] > 0)
  leaves = dict(_flatten(params))
  paths = {e.flax_path for e in entries}
  extra = sorted("/".join(p) for p in set(leaves) - paths)
  missing = sorted("/".join(p) for p in paths - set(leaves))
  if extra or missing:
    raise ValueError(f"export_torch_convnext: not a ConvNeXt tree ({cfg}); missing parameters "
                     f"{missing}, unexpected parameters {extra}")
  return {e.torch_key: np.ascontiguousarray(_to_torch(e.kind, np.asarray(leaves[e.flax_path],
                                                                         np.float32)))
          for e in entries}
