"""timm's RandAugment on 8-bit gray PIL images, drawn from a numpy generator."""
import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _negate(v, rng):
  return -v if rng.random() > 0.5 else v


def _affine(im, data, fill, resample):
  return im.transform(im.size, Image.AFFINE, data, resample=resample, fillcolor=fill)


def _solarize_add(im, add, thresh=128):
  return im.point([min(255, i + add) if i < thresh else i for i in range(256)])


def _posterize(im, bits):
  """Keeps the `bits` high bits; 0 bits is a black image (timm's PIL < 13 behaviour)."""
  if bits >= 8:
    return im
  return ImageOps.posterize(im, bits) if bits > 0 else Image.new(im.mode, im.size, 0)


def _enhance(kind):
  return lambda im, a, f, r: getattr(ImageEnhance, kind)(im).enhance(a)


# The four PIL enhancers share their levels: a factor in [0.1, 1.9], or, increasing with
# the magnitude, 1 +- up to 0.9.
_ENHANCERS = ("Color", "Contrast", "Brightness", "Sharpness")
_factor = lambda m, rng: m / 10 * 1.8 + 0.1
_factor_increasing = lambda m, rng: max(0.1, 1.0 + _negate(m / 10 * 0.9, rng))

# name -> (op(im, arg, fill, resample), level(magnitude in [0, 10], rng) -> arg)
# Levels as timm.data.auto_augment (_LEVEL_DENOM 10, translate_pct 0.45).
_OPS = {
    "AutoContrast": (lambda im, a, f, r: ImageOps.autocontrast(im), None),
    "Equalize": (lambda im, a, f, r: ImageOps.equalize(im), None),
    "Invert": (lambda im, a, f, r: ImageOps.invert(im), None),
    "Rotate": (lambda im, a, f, r: im.rotate(a, resample=r, fillcolor=f),
               lambda m, rng: _negate(m / 10 * 30.0, rng)),
    "Posterize": (lambda im, a, f, r: _posterize(im, a), lambda m, rng: int(m / 10 * 4)),
    "PosterizeIncreasing": (lambda im, a, f, r: _posterize(im, a),
                            lambda m, rng: 4 - int(m / 10 * 4)),
    "Solarize": (lambda im, a, f, r: ImageOps.solarize(im, a), lambda m, rng: int(m / 10 * 256)),
    "SolarizeIncreasing": (lambda im, a, f, r: ImageOps.solarize(im, a),
                           lambda m, rng: 256 - int(m / 10 * 256)),
    "SolarizeAdd": (lambda im, a, f, r: _solarize_add(im, a), lambda m, rng: int(m / 10 * 110)),
    "ShearX": (lambda im, a, f, r: _affine(im, (1, a, 0, 0, 1, 0), f, r),
               lambda m, rng: _negate(m / 10 * 0.3, rng)),
    "ShearY": (lambda im, a, f, r: _affine(im, (1, 0, 0, a, 1, 0), f, r),
               lambda m, rng: _negate(m / 10 * 0.3, rng)),
    "TranslateXRel": (lambda im, a, f, r: _affine(im, (1, 0, a * im.size[0], 0, 1, 0), f, r),
                      lambda m, rng: _negate(m / 10 * 0.45, rng)),
    "TranslateYRel": (lambda im, a, f, r: _affine(im, (1, 0, 0, 0, 1, a * im.size[1]), f, r),
                      lambda m, rng: _negate(m / 10 * 0.45, rng)),
    **{kind: (_enhance(kind), _factor) for kind in _ENHANCERS},
    **{f"{kind}Increasing": (_enhance(kind), _factor_increasing) for kind in _ENHANCERS},
}

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment on gray images: `num_layers` ops drawn with replacement,
  each applied with probability `prob` at a magnitude ~ N(magnitude, magnitude_std)
  clipped to [0, magnitude_max].

  `parse('rand-m9-mstd0.5-inc1')` reads timm's config string (keys m, n, mstd,
  mmax, inc; the op-weight key w is not supported).
  """
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = 10.0
  ops: tuple[str, ...] = RAND_TRANSFORMS
  prob: float = 0.5

  @classmethod
  def parse(cls, config_str: str) -> "RandAugment":
    parts = config_str.split("-")
    if parts[0] != "rand":
      raise ValueError(f'RandAugment config {config_str!r} does not start with "rand"')
    kwargs = {}
    for part in parts[1:]:
      key, val, *_ = re.split(r"(\d.*)", part) + [""]
      if not val:
        continue
      if key == "m":
        kwargs["magnitude"] = float(int(val))
      elif key == "n":
        kwargs["num_layers"] = int(val)
      elif key == "mstd":
        kwargs["magnitude_std"] = math.inf if float(val) > 100 else float(val)
      elif key == "mmax":
        kwargs["magnitude_max"] = float(int(val))
      elif key == "inc":
        if int(val):
          kwargs["ops"] = RAND_INCREASING_TRANSFORMS
      else:
        raise ValueError(f"RandAugment config {config_str!r}: unsupported section {part!r}")
    return cls(**kwargs)

  def __call__(self, im: Image.Image, rng: np.random.Generator, fill: int,
               resample: int = Image.BICUBIC) -> Image.Image:
    for k in rng.integers(0, len(self.ops), self.num_layers):
      op, level = _OPS[self.ops[k]]
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      m = self.magnitude
      if self.magnitude_std == math.inf:
        m = rng.uniform(0, m)
      elif self.magnitude_std > 0:
        m = rng.normal(m, self.magnitude_std)
      m = max(0.0, min(m, self.magnitude_max))
      im = op(im, None if level is None else level(m, rng), fill, resample)
    return im
