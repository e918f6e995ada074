"""Named ConvNeXt sizes: name -> (depths, dims).

``tiny`` to ``large`` are the official ConvNeXt sizes (Liu et al. 2022);
``nano`` is ours, small enough to train on a laptop CPU at 64^3.
"""
VARIANTS = {
    "nano": ((2, 2, 2, 2), (16, 32, 64, 128)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


def variant(name):
  """``{'depths': ..., 'dims': ...}`` for a variant name, with a clear error."""
  if name not in VARIANTS:
    raise ValueError(f"unknown ConvNeXt variant {name!r}; choose from {sorted(VARIANTS)}")
  depths, dims = VARIANTS[name]
  return {"depths": depths, "dims": dims}
