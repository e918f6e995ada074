"""``python -m covid3d.bench imagenet``: host memory and throughput of the streamed ImageNet input.

Writes an ImageNet-shaped stand-in (``--train`` JPEGs of ImageNet-like sizes,
mostly 500 x 375, textured so they compress like photos, in
``ILSVRC2012_img_train.tar`` / ``ILSVRC2012_img_val.tar`` as ImageNet ships
them), prepares it as the TFDS ``imagenet2012`` array_record dataset in a
child process (`covid3d.data.imagenet.prepare`, no TensorFlow), then streams
``--batches`` training batches of the 2-D stage through
`covid3d.data.imagenet.train_dataset` (the official recipe's augmentations
unless ``--plain``) and reports:

* the peak resident memory (VmHWM, reset through /proc/self/clear_refs once
  the source is open and the pipeline built, before its first batch), the
  part of it above the resident memory at that point (threads, buffered
  batches, decode and augmentation temporaries), and the resident memory
  every ``--every`` batches,
  so a flat line shows that memory does not grow with the batches read;
* images/s (JPEG decode + augmentation on the host's cores);
* the old design's projection: the whole training split as float32 images,
  N x S^2 x 4 bytes, for this stand-in and for ImageNet-1k (1,281,167 images).
"""
import io
import multiprocessing
import os
import tarfile
import tempfile
import time

import numpy as np

from covid3d.bench.common import print_table
from covid3d.bench.rss import memory, reset_peak

# (width, height) of ImageNet-like images and their shares; the rest uniform in [200, 800]^2.
SIZES = (((500, 375), 0.45), ((375, 500), 0.2), ((500, 333), 0.15), ((500, 500), 0.05),
         ((333, 500), 0.05))


def register(subparsers):
  p = subparsers.add_parser("imagenet", help="streamed grayscale ImageNet: peak host memory, "
                                             "images/s (synthetic ImageNet-shaped data)")
  p.add_argument("--train", type=int, default=3000, help="training JPEGs to generate")
  p.add_argument("--val", type=int, default=200, help="validation JPEGs to generate")
  p.add_argument("--classes", type=int, default=100, help="classes of the stand-in")
  p.add_argument("--size", type=int, default=224, help="model input edge S")
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--batches", type=int, default=300, help="batches to stream")
  p.add_argument("--threads", type=int, default=2, help="grain reader threads")
  p.add_argument("--prefetch", type=int, default=4, help="prefetched batches")
  p.add_argument("--workers", type=int, default=0, help="grain worker processes")
  p.add_argument("--dtype", default="float32", choices=("float32", "uint8"))
  p.add_argument("--plain", action="store_true", help="no augmentation (resize + centre crop)")
  p.add_argument("--every", type=int, default=50, help="sample the resident memory every N batches")
  p.add_argument("--dir", default="", help="keep the stand-in here (reused if present)")
  p.set_defaults(func=run)


def natural_jpeg(width: int, height: int, rng: np.random.Generator, quality: int = 90) -> bytes:
  """A colour JPEG that compresses like a photo: a smooth random field plus texture."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  img += rng.normal(0, 10, (height, width, 1)).astype(np.float32)
  out = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
  return out.getvalue()


def image_size(rng: np.random.Generator, max_side: int | None = None) -> tuple[int, int]:
  """An ImageNet-like (width, height); scaled down to fit `max_side` if given."""
  u, acc = rng.random(), 0.0
  w, h = int(rng.integers(200, 801)), int(rng.integers(200, 801))
  for size, share in SIZES:
    acc += share
    if u < acc:
      w, h = size
      break
  if max_side and max(w, h) > max_side:
    scale = max_side / max(w, h)
    w, h = max(8, int(w * scale)), max(8, int(h * scale))
  return w, h


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_manual_dir(root: str, train: int, val: int, classes: int = 10, seed: int = 0,
                     max_side: int | None = None) -> dict:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar of random JPEGs under `root`.

  Training image i belongs to class i % classes (the first `classes` synsets of
  TFDS's labels.txt) and is named '<wnid>_<i>.JPEG' inside '<wnid>.tar', as in
  ImageNet; validation images are 'ILSVRC2012_val_<8 digits>.JPEG' (their
  labels come from TFDS's validation_labels.txt, as for the real data).

  Returns:
    {'train_bytes', 'val_bytes'}: JPEG bytes written.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  wnids = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  sizes = {"train_bytes": 0, "val_bytes": 0}
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as outer:
    for c in range(classes):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
        for i in range(c, train, classes):
          jpeg = natural_jpeg(*image_size(rng, max_side), rng)
          sizes["train_bytes"] += len(jpeg)
          _add(inner, f"{wnids[c]}_{i}.JPEG", jpeg)
      _add(outer, f"{wnids[c]}.tar", inner_bytes.getvalue())
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_val.tar"), "w") as tar:
    for i in range(val):
      jpeg = natural_jpeg(*image_size(rng, max_side), rng)
      sizes["val_bytes"] += len(jpeg)
      _add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)
  return sizes


def _prepare(manual_dir, data_dir):
  from covid3d.data import imagenet  # pylint: disable=g-import-not-at-top
  imagenet.prepare(manual_dir, data_dir)


def run(args):
  from covid3d.data import imagenet  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or tmp
    manual, data_dir = os.path.join(root, "manual"), os.path.join(root, "tfds")
    if not os.path.exists(os.path.join(manual, "ILSVRC2012_img_val.tar")):
      t = time.perf_counter()
      written = write_manual_dir(manual, args.train, args.val, args.classes)
      print(f'wrote {args.train} + {args.val} JPEGs ({written["train_bytes"] / 1e6:.0f} + '
            f'{written["val_bytes"] / 1e6:.0f} MB, {written["train_bytes"] / args.train / 1e3:.0f}'
            f' kB each) in {time.perf_counter() - t:.0f} s')
    t = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=_prepare, args=(manual, data_dir))
    child.start()
    child.join()
    if child.exitcode:
      raise SystemExit(f"preparing the stand-in failed (exit code {child.exitcode})")
    print(f"prepared imagenet2012 (array_record) in {time.perf_counter() - t:.0f} s "
          "(child process)")

    source = imagenet.open_source("train", data_dir=data_dir, prepare_if_missing=False)
    n, s = len(source), args.size
    if args.plain:
      transform = imagenet.TrainTransform(size=s, random_crop=False, randaugment="", erase=0.0)
      mixup = None
    else:
      transform, mixup = imagenet.TrainTransform(size=s), imagenet.Mixup()
    ds = imagenet.train_dataset(source, global_batch_size=args.batch, transform=transform,
                                mixup=mixup, seed=0, threads=args.threads,
                                prefetch=args.prefetch, workers=args.workers,
                                image_dtype=args.dtype)
    reset = reset_peak()
    base = memory()  # source open, pipeline built, nothing read yet
    it = iter(ds)
    batch = next(it)
    batch_bytes = sum(v.nbytes for v in batch.values())
    rows, t0 = [], time.perf_counter()
    for k in range(1, args.batches + 1):
      next(it)
      if k % args.every == 0 or k == args.batches:
        m = memory()
        rows.append({"batches": k, "images": k * args.batch,
                     "images_per_s": k * args.batch / (time.perf_counter() - t0),
                     "rss_MB": m["VmRSS"] / 1e6, "peak_MB": m["VmHWM"] / 1e6})
    print(f'streamed {args.batches} batches of {args.batch} x {s}^2 ({args.dtype}, '
          f'{"plain" if args.plain else "official recipe"}, {args.threads} threads, prefetch '
          f'{args.prefetch}, workers {args.workers}) from {n} training images '
          f'({args.batches * args.batch / n:.1f} epochs); one batch = {batch_bytes / 1e6:.1f} MB; '
          f'{os.cpu_count()} host cores')
    print_table(rows)
    peak = memory()["VmHWM"]
    old = n * s * s * 4
    old_full = imagenet.TRAIN_IMAGES * s * s * 4
    print(f'resident before streaming: {base["VmRSS"] / 1e6:.0f} MB (Python, numpy, grain, TFDS, '
          f'the open data source); peak while streaming: {peak / 1e6:.0f} MB '
          f'({"VmHWM reset before streaming" if reset else "VmHWM since start"}), i.e. '
          f'{(peak - base["VmRSS"]) / 1e6:.0f} MB above it for the pipeline (reader threads, '
          f'array_record and JPEG buffers, the batches in flight and their temporaries)')
    print(f"old design (whole split as float32 in memory): {old / 1e9:.2f} GB for these {n} "
          f"images; {old_full / 1e9:.0f} GB for ImageNet-1k ({imagenet.TRAIN_IMAGES} images)")
    if hasattr(it, "close"):
      it.close()
