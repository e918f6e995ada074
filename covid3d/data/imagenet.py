"""Grayscale ImageNet for the 2-D stage, streamed: TFDS array_record -> grain batches.

Flow (docs/data.md, "ImageNet for the 2-D stage"):

  TFDS ``imagenet2012`` data source (array_record, random access, the JPEG
  bytes undecoded; no TensorFlow at read time, `prepare` builds it without
  TensorFlow too)
    -> train: the record indices shuffled per epoch from the seed (grain's
       index shuffle, O(1) memory), cut into global batches of G, the last
       incomplete one of each epoch dropped, repeated
       eval: in order, padded with -1 to a multiple of G
    -> this process's slice of each global batch: positions [p*b, (p+1)*b),
       b = G / process_count
    -> per example (grain reader threads, prefetched): JPEG decode -> gray
       (ITU-R 601 luma) -> train: random resized crop + flip, RandAugment,
       random erasing, each from a generator seeded by (seed, epoch, record);
       eval: resize + centre crop
    -> per batch: mixup / cutmix from a generator seeded by (seed, batch
       number), drawn for the whole global batch so every process agrees

Host memory holds the batches in flight (about ``threads + prefetch`` of
them) and one decoded JPEG per thread, whatever the dataset size; the old
design held the whole split as float32 (1,281,167 x 224^2 x 4 B = 257 GB).

Every process runs the same index pipeline from the same seed, and every
random draw depends only on (seed, epoch, record) or (seed, batch number), so
the global batch, augmentations included, does not depend on the number of
processes, and a run resumed from an iterator state (``{'next_index': k}``,
JSON) continues exactly as an uninterrupted one.

The augmentations follow the official ConvNeXt/DeiT ImageNet recipe (timm
``create_transform`` and ``Mixup``), re-implemented here with PIL and numpy
for one-channel images; the differences are listed in docs/data.md.
"""
import dataclasses
import io
import math
import os
import re
import tarfile
from collections.abc import Mapping, Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

NAME = "imagenet2012"
NUM_CLASSES = 1000
TRAIN_IMAGES = 1_281_167             # ImageNet-1k training split
VALIDATION_IMAGES = 50_000
# Tags of the seed sequences, so example and batch generators never coincide.
_EXAMPLE, _MIX = 1, 2


# --------------------------------------------------------------------------
# The TFDS data source.

def _builder_class():
  """The TFDS imagenet2012 builder, preparing without TensorFlow.

  The official builder (same name, version and features, so the prepared
  dataset is the one ``tfds.data_source('imagenet2012')`` reads) lists its
  archives with ``tf.io.gfile`` and fixes its 23 CMYK/PNG images with
  ``tf.image``; here the archives are read with ``tarfile`` and the images
  fixed with PIL.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=g-import-not-at-top
      imagenet2012_dataset_builder as official)

  class Builder(official.Builder, skip_registration=True):
    """imagenet2012 from ILSVRC2012_img_{train,val}.tar, without TensorFlow."""
    name = NAME

    def _split_generators(self, dl_manager):
      manual = str(dl_manager.manual_dir)
      splits = {}
      train = os.path.join(manual, "ILSVRC2012_img_train.tar")
      val = os.path.join(manual, "ILSVRC2012_img_val.tar")
      if os.path.exists(train):
        splits["train"] = self._generate_examples(_iter_tar(train))
      if os.path.exists(val):
        splits["validation"] = self._generate_examples(
            _iter_tar(val), validation_labels=_validation_labels(val))
      if not splits:
        raise FileNotFoundError(
            f"{manual} has neither ILSVRC2012_img_train.tar nor ILSVRC2012_img_val.tar "
            "(the ImageNet 2012 archives from https://image-net.org/download-images)")
      return splits

    def _fix_image(self, image_fname, image):
      if image_fname in official.CMYK_IMAGES or image_fname in official.PNG_IMAGES:
        out = io.BytesIO()
        Image.open(image).convert("RGB").save(out, "JPEG", quality=100)
        out.seek(0)
        return out
      return image

  del tfds
  return Builder


def _iter_tar(path):
  """(member base name, file object) of each file of a tar archive, streamed."""
  with tarfile.open(path, "r|*") as tar:
    for member in tar:
      if member.isfile():
        yield os.path.basename(member.name), tar.extractfile(member)


def _validation_labels(val_tar: str) -> dict:
  """Validation image name -> label name, as the official builder (sorted names)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  labels = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)  # pylint: disable=protected-access
  labels = labels.read_text().strip().splitlines()
  with tarfile.open(val_tar, "r:*") as tar:
    names = sorted(os.path.basename(n) for n in tar.getnames())
  # The real archive has all 50,000 labelled names; a smaller one the first of them.
  return dict(zip(names, labels[:len(names)], strict=True))


def prepare(manual_dir: str, data_dir: str | None = None):
  """Builds the TFDS ``imagenet2012`` array_record dataset, without TensorFlow.

  Args:
    manual_dir: holds ILSVRC2012_img_train.tar and/or ILSVRC2012_img_val.tar.
    data_dir: TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    The prepared builder. A dataset already prepared there is left as it is.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder_class()(data_dir=data_dir or None, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def open_source(split: str, manual_dir: str = "", data_dir: str | None = None,
                prepare_if_missing: bool = True):
  """Random-access records of an ``imagenet2012`` split, JPEG bytes undecoded.

  Args:
    split: 'train' or 'validation'.
    manual_dir: the ImageNet archives (`prepare`), used only when the dataset
      is not prepared in `data_dir` yet.
    data_dir: TFDS data dir (None or '': $TFDS_DATA_DIR or ~/tensorflow_datasets).
    prepare_if_missing: prepare it from `manual_dir` when missing.

  Returns:
    A TFDS ArrayRecordDataSource: ``len``, ``[i]`` / ``__getitems__`` ->
    {'image': JPEG bytes, 'label': int, 'file_name': bytes}.

  Raises:
    FileNotFoundError: the dataset is not prepared and cannot be.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or None
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    if not (prepare_if_missing and manual_dir):
      raise FileNotFoundError(
          f"{NAME} is not prepared in {builder.data_dir}: give the folder of the ImageNet "
          "archives (--config.data.imagenet_dir) or prepare it once with "
          "covid3d.data.imagenet.prepare(manual_dir, data_dir)")
    prepare(manual_dir, data_dir)
  return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})


# --------------------------------------------------------------------------
# Per-example transforms (PIL 'L' images, numpy generators).

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
    "Color": (lambda im, a, f, r: ImageEnhance.Color(im).enhance(a),
              lambda m, rng: m / 10 * 1.8 + 0.1),
    "ColorIncreasing": (lambda im, a, f, r: ImageEnhance.Color(im).enhance(a),
                        lambda m, rng: max(0.1, 1.0 + _negate(m / 10 * 0.9, rng))),
    "Contrast": (lambda im, a, f, r: ImageEnhance.Contrast(im).enhance(a),
                 lambda m, rng: m / 10 * 1.8 + 0.1),
    "ContrastIncreasing": (lambda im, a, f, r: ImageEnhance.Contrast(im).enhance(a),
                           lambda m, rng: max(0.1, 1.0 + _negate(m / 10 * 0.9, rng))),
    "Brightness": (lambda im, a, f, r: ImageEnhance.Brightness(im).enhance(a),
                   lambda m, rng: m / 10 * 1.8 + 0.1),
    "BrightnessIncreasing": (lambda im, a, f, r: ImageEnhance.Brightness(im).enhance(a),
                             lambda m, rng: max(0.1, 1.0 + _negate(m / 10 * 0.9, rng))),
    "Sharpness": (lambda im, a, f, r: ImageEnhance.Sharpness(im).enhance(a),
                  lambda m, rng: m / 10 * 1.8 + 0.1),
    "SharpnessIncreasing": (lambda im, a, f, r: ImageEnhance.Sharpness(im).enhance(a),
                            lambda m, rng: max(0.1, 1.0 + _negate(m / 10 * 0.9, rng))),
    "ShearX": (lambda im, a, f, r: _affine(im, (1, a, 0, 0, 1, 0), f, r),
               lambda m, rng: _negate(m / 10 * 0.3, rng)),
    "ShearY": (lambda im, a, f, r: _affine(im, (1, 0, 0, a, 1, 0), f, r),
               lambda m, rng: _negate(m / 10 * 0.3, rng)),
    "TranslateXRel": (lambda im, a, f, r: _affine(im, (1, 0, a * im.size[0], 0, 1, 0), f, r),
                      lambda m, rng: _negate(m / 10 * 0.45, rng)),
    "TranslateYRel": (lambda im, a, f, r: _affine(im, (1, 0, 0, 0, 1, a * im.size[1]), f, r),
                      lambda m, rng: _negate(m / 10 * 0.45, rng)),
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
  mean: float = 0.485 * 0.299 + 0.456 * 0.587 + 0.406 * 0.114
  std: float = 0.226
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


# --------------------------------------------------------------------------
# Mixup / CutMix on a batch.

@dataclasses.dataclass(frozen=True)
class Mixup:
  """timm Mixup/CutMix, drawn per global batch and applied to this process's slice.

  Example j of a global batch is mixed with example j XOR 1 (its neighbour;
  the batch is a random permutation, so this is a random pairing like timm's
  j <-> B-1-j, but one that stays inside every process's slice when the slice
  is even). With probability `prob` a batch (mode 'batch') or a pair (mode
  'pair') is mixed: CutMix with probability `switch_prob` when both alphas are
  positive, lam ~ Beta(alpha, alpha), the CutMix box from lam and lam then
  corrected to the box's area (timm ``correct_lam``).

  Attributes:
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind.
    prob: probability of mixing a batch / pair.
    switch_prob: probability of CutMix instead of mixup when both are on.
    mode: 'batch' (one lam and box per global batch; timm's default, where
      a "batch" is one GPU's) or 'pair' (one per pair of examples).
  """
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  mode: str = "batch"

  def __post_init__(self):
    if self.mode not in ("batch", "pair"):
      raise ValueError(f"mixup mode {self.mode!r} is not 'batch' or 'pair'")

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  def params(self, rng: np.random.Generator, pairs: int, size: int):
    """lam, CutMix flag and box (y0, y1, x0, x1) per pair: arrays of `pairs` rows."""
    n = 1 if self.mode == "batch" else pairs
    mixed = rng.random(n) < self.prob
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      cut = rng.random(n) < self.switch_prob
    else:
      cut = np.full(n, self.cutmix_alpha > 0)
    lam = np.where(cut, rng.beta(max(self.cutmix_alpha, 1e-6), max(self.cutmix_alpha, 1e-6), n),
                   rng.beta(max(self.mixup_alpha, 1e-6), max(self.mixup_alpha, 1e-6), n))
    lam = np.where(mixed, lam, 1.0)
    cut &= mixed
    # timm rand_bbox: a square of side S * sqrt(1 - lam) around a uniform centre, clipped.
    cut_len = (size * np.sqrt(1.0 - lam)).astype(np.int64)
    cy, cx = rng.integers(0, size, n), rng.integers(0, size, n)
    y0, y1 = np.clip(cy - cut_len // 2, 0, size), np.clip(cy + cut_len // 2, 0, size)
    x0, x1 = np.clip(cx - cut_len // 2, 0, size), np.clip(cx + cut_len // 2, 0, size)
    lam = np.where(cut, 1.0 - (y1 - y0) * (x1 - x0) / float(size * size), lam)
    box = np.stack([y0, y1, x0, x1], -1)
    if n == 1:
      lam, cut, box = (np.repeat(a, pairs, 0) for a in (lam, cut, box))
    return lam.astype(np.float32), cut, box

  def __call__(self, batch: dict, rng: np.random.Generator, global_batch: int,
               start: int) -> dict:
    """Mixes `batch` (positions [start, start + b) of the global batch, b even).

    Adds 'label_mix' (the partner's label) and 'mix_lam' (weight of 'label').
    A float32 'image' is mixed in place.
    """
    image = batch["image"]
    b, size = image.shape[0], image.shape[1]
    if b % 2 or start % 2:
      raise ValueError(f"mixup pairs examples: the per-process batch ({b}) must be even")
    lam, cut, box = self.params(rng, global_batch // 2, size)
    pair = slice(start // 2, start // 2 + b // 2)
    lam, cut, box = (np.repeat(a[pair], 2, 0) for a in (lam, cut, box))
    partner = np.arange(b) ^ 1
    # Two batch-sized float arrays: the result (in place in a float32 image)
    # and the partners' originals.
    x = image if image.dtype == np.float32 else image.astype(np.float32)
    other = x[partner]
    for i in np.nonzero(cut)[0]:
      y0, y1, x0, x1 = box[i]
      x[i, y0:y1, x0:x1] = other[i, y0:y1, x0:x1]
    w = np.where(cut, 1.0, lam).astype(np.float32).reshape((b,) + (1,) * (x.ndim - 1))
    x *= w
    other *= 1.0 - w
    x += other
    mixed = np.clip(np.rint(x), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else x
    out = dict(batch)
    out["image"] = mixed
    out["label_mix"] = batch["label"][partner]
    out["mix_lam"] = lam
    return out


# --------------------------------------------------------------------------
# grain pipelines.

def _read(source, indices: Sequence[int]) -> list:
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _finish(images: list, image_dtype: str) -> np.ndarray:
  x = np.stack(images)[..., None]
  if image_dtype == "uint8":
    return x
  if image_dtype == "float32":
    out = x.astype(np.float32)
    out *= np.float32(1 / 255)
    return out
  raise ValueError(f"image_dtype {image_dtype!r} is not 'float32' or 'uint8'")


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Host batch k (global batch k, this process's positions) -> dict of arrays."""
  source: Sequence[Mapping]
  order: grain.MapDataset           # order[e * N + i]: record of epoch e's position i
  transform: TrainTransform
  mixup: Mixup | None
  seed: int
  num: int                          # N, records per epoch
  global_batch: int                 # G
  per_host: int                     # b
  start: int                        # p * b
  image_dtype: str

  def __call__(self, k: int, _) -> dict:
    per_epoch = self.num // self.global_batch
    epoch, kk = divmod(k, per_epoch)
    first = epoch * self.num + kk * self.global_batch + self.start
    records = [int(self.order[first + j]) for j in range(self.per_host)]
    images, labels = [], []
    for record, example in zip(records, _read(self.source, records), strict=True):
      rng = np.random.default_rng([self.seed, _EXAMPLE, epoch, record])
      images.append(self.transform(example["image"], rng))
      labels.append(example["label"])
    batch = {"image": _finish(images, self.image_dtype),
             "label": np.asarray(labels, np.int32),
             "record_index": np.asarray(records, np.int32)}
    if self.mixup is not None and self.mixup.active:
      batch = self.mixup(batch, np.random.default_rng([self.seed, _MIX, k]),
                         self.global_batch, self.start)
    return batch


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Host eval batch k: positions k*G + p*b + [0, b) of the records; past the end: padding."""
  source: Sequence[Mapping]
  indices: np.ndarray
  transform: EvalTransform
  global_batch: int
  per_host: int
  start: int
  image_dtype: str

  def __call__(self, k: int, _) -> dict:
    pos = k * self.global_batch + self.start + np.arange(self.per_host)
    valid = pos < len(self.indices)
    records = self.indices[pos[valid]]
    examples = _read(self.source, records) if len(records) else []
    images = [self.transform(e["image"]) for e in examples]
    images += [np.zeros((self.transform.size,) * 2, np.uint8)] * int((~valid).sum())
    label = np.full(self.per_host, -1, np.int32)
    label[valid] = [e["label"] for e in examples]
    index = np.full(self.per_host, -1, np.int32)
    index[valid] = records
    return {"image": _finish(images, self.image_dtype), "label": label, "valid": valid,
            "record_index": index}


def _check(global_batch_size, process_count, n, train):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                     f"the process count {process_count}")
  if n == 0 or (train and n < global_batch_size):
    raise ValueError(f"{n} images, fewer than one global batch of {global_batch_size}")


def _iter_dataset(ds: grain.MapDataset, threads: int, prefetch: int,
                  workers: int) -> grain.IterDataset:
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                             prefetch_buffer_size=prefetch))
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its flags (outside absl.app)
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                       per_worker_buffer_size=1))
  return out


def train_dataset(source: Sequence[Mapping], *, global_batch_size: int,
                  transform: TrainTransform, mixup: Mixup | None = None, seed: int = 0,
                  num_records: int | None = None, num_epochs: int | None = None,
                  process_index: int = 0, process_count: int = 1, threads: int = 4,
                  prefetch: int = 4, workers: int = 0,
                  image_dtype: str = "float32") -> grain.IterDataset:
  """This process's augmented training batches, endless (or `num_epochs` epochs).

  Args:
    source: records {'image': JPEG bytes or an (H, W[, 3]) uint8 array,
      'label': int} (`open_source`).
    global_batch_size: G, summed over processes.
    transform: per-example augmentation.
    mixup: batch mixing (None: none).
    seed: shuffle and augmentation seed, 0 <= seed < 2**32, the same on
      every process.
    num_records: use records [0, num_records) only (None: all).
    num_epochs: None: repeat forever.
    process_index, process_count: this process and the number of processes.
    threads, prefetch: grain reader threads and prefetched batches.
    workers: > 0: also that many grain worker processes (`mp_prefetch`),
      for when the per-example Python work outgrows one process's GIL.
    image_dtype: 'float32' (in [0, 1]) or 'uint8' (0..255: a quarter of the
      host memory and transfer; the model must divide by 255).

  Returns:
    IterDataset of dicts: 'image' (b, S, S, 1), 'label' int32 (b,),
    'record_index' int32 (b,) and, with mixup, 'label_mix' int32 (b,) and
    'mix_lam' float32 (b,) (the target is mix_lam * onehot(label) +
    (1 - mix_lam) * onehot(label_mix)). b = G / process_count. Its iterators
    have JSON-serialisable get_state() / set_state().
  """
  n = len(source) if num_records is None else min(int(num_records), len(source))
  _check(global_batch_size, process_count, n, True)
  per_host = global_batch_size // process_count
  order = grain.MapDataset.source(np.arange(n, dtype=np.int64)).shuffle(seed=seed)
  loader = _TrainBatch(source, order, transform, mixup, seed, n, global_batch_size, per_host,
                       process_index * per_host, image_dtype)
  ds = grain.MapDataset.range(n // global_batch_size).repeat(num_epochs).map_with_index(loader)
  return _iter_dataset(ds, threads, prefetch, workers)


def eval_dataset(source: Sequence[Mapping], *, global_batch_size: int,
                 transform: EvalTransform, num_records: int | None = None,
                 process_index: int = 0, process_count: int = 1, threads: int = 4,
                 prefetch: int = 4, image_dtype: str = "float32") -> grain.IterDataset:
  """One pass over the records in order, this process's share of each global batch.

  The last global batch is padded ('valid' False, label -1, zero image), so
  every process yields ceil(N / G) batches of b = G / process_count and every
  record is seen exactly once.
  """
  n = len(source) if num_records is None else min(int(num_records), len(source))
  _check(global_batch_size, process_count, n, False)
  per_host = global_batch_size // process_count
  loader = _EvalBatch(source, np.arange(n, dtype=np.int64), transform, global_batch_size,
                      per_host, process_index * per_host, image_dtype)
  ds = grain.MapDataset.range(-(-n // global_batch_size)).map_with_index(loader)
  return _iter_dataset(ds, threads, prefetch, 0)
