"""Per-example transforms of ImageNet images (PIL 'L' images, numpy generators).

Training: decode to gray, random resized crop + flip, RandAugment, random
erasing; evaluation: decode to gray, resize and centre crop (the official
ConvNeXt/DeiT recipe, timm ``create_transform``).
"""
import dataclasses
import io
import math

import numpy as np
from PIL import Image

from covid3d.data.imagenet.randaugment import RandAugment

# The official recipe's input normalisation (timm's IMAGENET_DEFAULT_MEAN/STD),
# per RGB channel, and torchvision's Grayscale weights, which the authors apply
# to the normalised RGB image.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_GRAY = (0.2989, 0.587, 0.114)


def gray_normalisation() -> tuple[float, float]:
  """(mean, std) in [0, 1] units that give the authors' 2-D input for a gray pixel.

  They normalise each RGB channel, ``(x_c - m_c) / s_c``, then take
  ``sum_c w_c (.)`` (``TORCH_GRAY``). For a gray pixel (``x_c = x``) that is
  ``(x - mean) / std`` with ``std = 1 / sum_c w_c / s_c`` and ``mean = std *
  sum_c w_c m_c / s_c``: about 0.4588 and 0.2256. For a coloured pixel their
  channel weights ``w_c / s_c`` differ from the luma weights these scale by
  1.5 % at most.
  """
  gain = sum(w / s for w, s in zip(TORCH_GRAY, IMAGENET_STD, strict=True))
  offset = sum(w * m / s for w, m, s in zip(TORCH_GRAY, IMAGENET_MEAN, IMAGENET_STD, strict=True))
  return offset / gain, 1.0 / gain


def decode_gray(image) -> Image.Image:
  """JPEG bytes (or an RGB/gray array) -> 8-bit gray PIL image.

  The gray value is PIL's ITU-R 601 luma, L = 0.299 R + 0.587 G + 0.114 B
  (the weights of ``pretrain2d.GRAY``) rounded to an integer.
  """
  if isinstance(image, np.ndarray):
    im = Image.fromarray(np.squeeze(np.asarray(image, np.uint8)))
  else:
    im = Image.open(io.BytesIO(image))
  if im.mode not in ("L", "RGB"):
    im = im.convert("RGB")
  return im.convert("L") if im.mode != "L" else im


def _resample(name: str) -> int:
  return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[name]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
  """timm/torchvision RandomResizedCrop parameters: box (left, top, right, bottom).

  Up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio
  in `ratio` that fit the image; else the centre crop of the largest allowed
  aspect ratio.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resize_center_crop(im: Image.Image, size: int, crop_pct: float = 0.875,
                       interpolation: str = "bicubic") -> Image.Image:
  """The ConvNeXt evaluation transform: shorter side to int(size / crop_pct), centre crop."""
  short = int(size / crop_pct)
  w, h = im.size
  nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  im = im.resize((nw, nh), _resample(interpolation))
  top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
  return im.crop((left, top, left + size, top + size))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Per-example training augmentation: decode, gray, crop + flip, RandAugment, erasing.

  Attributes:
    size: output edge S.
    random_crop: random resized crop (scale, ratio) + horizontal flip (p
      `hflip`); False: the eval transform (resize + centre crop) instead.
    scale, ratio: random resized crop's area fraction and aspect-ratio ranges.
    hflip: horizontal flip probability.
    randaugment: timm config string ('rand-m9-mstd0.5-inc1'), '' for none.
    erase: random erasing probability (timm mode 'pixel', one box of 2 to
      33 % of the area, aspect 0.3 to 3.3).
    mean, std: the model's input normalisation in [0, 1] units: erased
      pixels are mean + std * N(0, 1) (N(0, 1) after normalisation, as timm),
      clipped to [0, 1]; RandAugment fills with round(255 * mean).
    crop_pct: eval transform's crop fraction (when `random_crop` is False).
    interpolation: 'bicubic' (recipe) or 'bilinear'.
  """
  size: int = 224
  random_crop: bool = True
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  randaugment: str = "rand-m9-mstd0.5-inc1"
  erase: float = 0.25
  mean: float = gray_normalisation()[0]
  std: float = gray_normalisation()[1]
  crop_pct: float = 0.875
  interpolation: str = "bicubic"

  def __post_init__(self):
    # Parse once (and fail early on a bad string).
    object.__setattr__(self, "_ra", RandAugment.parse(self.randaugment)
                       if self.randaugment else None)

  def __call__(self, image, rng: np.random.Generator) -> np.ndarray:
    """JPEG bytes -> (S, S) uint8."""
    im = decode_gray(image)
    resample = _resample(self.interpolation)
    if self.random_crop:
      box = random_resized_crop_box(*im.size, rng, self.scale, self.ratio)
      im = im.resize((self.size, self.size), resample, box=box)
      if rng.random() < self.hflip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
      im = resize_center_crop(im, self.size, self.crop_pct, self.interpolation)
    if self._ra is not None:
      im = self._ra(im, rng, int(round(255 * self.mean)), resample)
    out = np.array(im, np.uint8)
    if self.erase > 0 and rng.random() < self.erase:
      random_erase(out, rng, self.mean, self.std)
    return out


def random_erase(image: np.ndarray, rng: np.random.Generator, mean: float, std: float,
                 area=(0.02, 1 / 3), aspect=0.3) -> np.ndarray:
  """timm RandomErasing (one box, mode 'pixel') on an (H, W) uint8 image, in place."""
  h_img, w_img = image.shape[:2]
  log_aspect = (math.log(aspect), math.log(1 / aspect))
  for _ in range(10):
    target = rng.uniform(*area) * h_img * w_img
    ar = math.exp(rng.uniform(*log_aspect))
    h, w = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
    if w < w_img and h < h_img:
      top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
      noise = (mean + std * rng.standard_normal((h, w) + image.shape[2:])) * 255
      image[top:top + h, left:left + w] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
      break
  return image


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Decode, gray, resize the shorter side to int(size / crop_pct), centre crop."""
  size: int = 224
  crop_pct: float = 0.875
  interpolation: str = "bicubic"

  def __call__(self, image, rng=None) -> np.ndarray:
    del rng
    return np.array(resize_center_crop(decode_gray(image), self.size, self.crop_pct,
                                       self.interpolation), np.uint8)
