"""``python -m covid3d.bench memory``: peak host memory and input rate of each stage's host side.

Writes synthetic data of the real shapes to a temporary folder:

* ``--scans`` COV19-CT-DB-like scans of ``--scan`` (slices x rows x columns)
  8-bit JPEG slices, a CT-size scan (`covid3d.bench.data.write_scans`);
* a record cache of ``--records`` scans at the cube sizes ``--sizes``, built
  by `preprocess.build_cache` from small JPEG scans (32 slices of 128^2: the
  records have the real shapes, and their content does not change the read
  rate), and a copy of it with the volumes quantised to uint8
  (round(255 v)), which `preprocess` does not write: what an 8-bit cache
  would give;
* ``--images`` ImageNet-like JPEGs (mostly 500 x 375) prepared as the TFDS
  ``imagenet2012`` array_record dataset (`covid3d.bench.imagenet`).

Then runs the host side of each stage in a fresh (spawned) process, so its
peak resident memory (VmHWM, the kernel's high-water mark of the
process's RSS, imports included) is that stage's own:

* ``preprocess``: `build_cache` of the CT-size scans to every cube size in
  one process (``--config.data.workers`` such processes run at once: a host
  needs workers x this);
* ``cls3d*``, ``seg3d*``: `pipeline.host_dataset` over the cache with a
  stage's fields (``image`` at the small size and a label; ``-crop`` adds the
  large cube as ``image_large``, the crop source of the default augmentation;
  ``seg3d`` adds the masks, absent from these records and read as zeros as
  for COV19-CT-DB), ``--batch`` volumes a batch, ``--threads`` reader threads,
  ``--prefetch`` batches ahead. Volumes reach the batch as float32 (the
  stages' default), as cached (``-f16``: float16, for the device to convert)
  or from the uint8 copy (``-u8``);
* ``imagenet2d``: `imagenet.train_dataset` (the official recipe: random
  resized crop, flip, RandAugment, erasing, mixup/CutMix) of ``--image-size``
  images, ``--image-batch`` a batch, as float32 (``-u8``: uint8).

The rate is items per second over ``--batches`` (``--image-batches``)
batches after the first one (the preprocess rate: scans per second over all
of them). The files were just written, so reads come from the page cache:
the upper bound that a local SSD approaches. ``--device-put`` adds
`jax.device_put` of each batch to the first device; on a CPU that copy is
host memory too.

Columns: stage, data, records, base_MiB (RSS after the imports and set-up,
before the work), peak_MiB, per_s and unit, cache_MB (bytes read from the
cache per item: the whole record file, every cube size) and batch_MB (bytes
per item of the host batch). This module imports no JAX at import time, so
a stage process holds only what its stage imports.
"""
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent import futures

import numpy as np

from covid3d.bench import rss

# The small JPEG scans the training cache is built from: (slices, in-plane size).
RECORD_SOURCE = (32, 128)


def register(subparsers):
  p = subparsers.add_parser("memory", help="peak host memory (RSS) and input rate of each "
                                           "stage's host side (synthetic data, real shapes)")
  p.add_argument("--stages", default=",".join(STAGES), help="comma separated, of " +
                 ", ".join(STAGES))
  p.add_argument("--sizes", default="256,224", help="cube sizes (large,small)")
  p.add_argument("--scan", default="300x512x512", help="CT-size scan: slices x rows x columns")
  p.add_argument("--scans", type=int, default=2, help="CT-size scans to preprocess")
  p.add_argument("--records", type=int, default=16, help="cached records to stream")
  p.add_argument("--batch", type=int, default=4, help="volumes per host batch")
  p.add_argument("--batches", type=int, default=48, help="3-D batches timed")
  p.add_argument("--threads", type=int, default=4, help="reader threads")
  p.add_argument("--prefetch", type=int, default=4, help="batches read ahead")
  p.add_argument("--images", type=int, default=1000, help="ImageNet-like JPEGs to write")
  p.add_argument("--image-size", type=int, default=224, help="2-D model input edge")
  p.add_argument("--image-batch", type=int, default=128, help="images per host batch")
  p.add_argument("--image-batches", type=int, default=16, help="2-D batches timed")
  p.add_argument("--device-put", action="store_true", help="jax.device_put each batch")
  p.add_argument("--json", default=None, metavar="FILE", help="also write the rows here")
  p.set_defaults(func=run)


# --------------------------------------------------------------------------
# The stages' host work, each run in a fresh process.

def _preprocess(refs, out_dir: str, sizes) -> dict:
  """`build_cache` of `refs` in this process: {'items', 'seconds', 'base'}."""
  from covid3d.data import preprocess  # pylint: disable=import-outside-toplevel
  base = rss.memory()["VmRSS"]
  t = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # its summary line
    preprocess.build_cache(refs, out_dir, sizes, workers=1, progress=False)
  return {"items": len(refs), "seconds": time.perf_counter() - t, "base": base}


def _timed_batches(ds, batches: int, device_put: bool) -> dict:
  """Reads one batch of ``ds``, then times ``batches`` more.

  Returns:
    {'items' (examples timed), 'seconds', 'batch_bytes' (per example, all arrays)}.
  """
  put = lambda batch: batch
  if device_put:
    import jax  # pylint: disable=import-outside-toplevel
    put = lambda batch: jax.block_until_ready(jax.device_put(batch))
  it = iter(ds)
  first = put(next(it))
  b = len(first["record_index"])
  t = time.perf_counter()
  for _ in range(batches):
    put(next(it))
  seconds = time.perf_counter() - t
  return {"items": b * batches, "seconds": seconds,
          "batch_bytes": sum(v.nbytes for v in first.values()) / b}


def _stream_volumes(paths, fields: dict, volume_dtype, batch: int, batches: int, threads: int,
                    prefetch: int, device_put: bool) -> dict:
  """A 3-D stage's training batches from cached records (`pipeline.host_dataset`).

  Returns `_timed_batches`'s dict plus 'base', the RSS in bytes before the first read.
  """
  from covid3d.data import pipeline  # pylint: disable=import-outside-toplevel
  source = pipeline.file_source(paths)
  ds = pipeline.host_dataset(source, np.arange(len(paths)), global_batch_size=batch,
                             fields=fields, train=True, threads=threads, prefetch=prefetch,
                             volume_dtype=volume_dtype)
  base = rss.memory()["VmRSS"]
  return {"base": base, **_timed_batches(ds, batches, device_put)}


def _stream_images(data_dir: str, size: int, batch: int, batches: int, threads: int,
                   prefetch: int, image_dtype: str, device_put: bool) -> dict:
  """The 2-D stage's augmented ImageNet batches (`imagenet.train_dataset`), as `_stream_volumes`."""
  from covid3d.data import imagenet  # pylint: disable=import-outside-toplevel
  source = imagenet.open_source("train", data_dir=data_dir, prepare_if_missing=False)
  ds = imagenet.train_dataset(source, global_batch_size=batch,
                              transform=imagenet.TrainTransform(size=size),
                              mixup=imagenet.Mixup(), threads=threads, prefetch=prefetch,
                              image_dtype=image_dtype)
  base = rss.memory()["VmRSS"]
  return {"base": base, **_timed_batches(ds, batches, device_put)}


def _measured(fn, kwargs: dict) -> dict:
  """``fn(**kwargs)`` plus this process's peak RSS ('peak')."""
  out = fn(**kwargs)
  return {**out, "peak": rss.memory()["VmHWM"]}


def in_fresh_process(fn, **kwargs) -> dict:
  """`_measured` of ``fn`` in a new spawned process (its own peak RSS)."""
  ctx = multiprocessing.get_context("spawn")
  with futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
    return ex.submit(_measured, fn, kwargs).result()


# --------------------------------------------------------------------------
# The rows.

def volume_stages(big: int, small: int) -> dict:
  """3-D rows: name -> (batch key -> record field, batch volume dtype, cache dtype)."""
  image = {"image": f"volume_{small}", "label": "covid"}
  crop = {**image, "image_large": f"volume_{big}"}
  seg = {**crop, "mask": f"mask_{small}", "mask_large": f"mask_{big}"}
  return {"cls3d": (image, "float32", "float16"),
          "cls3d-f16": (image, None, "float16"),
          "cls3d-u8": (image, None, "uint8"),
          "cls3d-crop": (crop, "float32", "float16"),
          "seg3d-crop": (seg, "float32", "float16")}


# The rows' names (the 3-D names do not depend on the sizes).
STAGES = ("preprocess", *volume_stages(256, 224), "imagenet2d", "imagenet2d-u8")


def _row(stage: str, data: str, records: int, unit: str, cache_bytes: float,
         got: dict) -> dict:
  mib = 2 ** 20
  return {"stage": stage, "data": data, "records": records, "base_MiB": got["base"] / mib,
          "peak_MiB": got["peak"] / mib, "per_s": got["items"] / got["seconds"], "unit": unit,
          "cache_MB": cache_bytes / 1e6, "batch_MB": got.get("batch_bytes", float("nan")) / 1e6}


def _mean_file_bytes(paths) -> float:
  return sum(os.path.getsize(p) for p in paths) / len(paths)


def uint8_copy(paths, folder: str) -> list[str]:
  """The cached records at ``paths`` with uint8 volumes round(255 v), written to ``folder``."""
  from covid3d.data import cache  # pylint: disable=import-outside-toplevel
  os.makedirs(folder)
  shutil.copy(os.path.join(os.path.dirname(paths[0]), cache.INDEX_FILE), folder)
  out = []
  for p in paths:
    record = cache.read_npz(p)
    for k in [k for k in record if k.startswith("volume_")]:
      record[k] = np.round(record[k].astype(np.float32) * 255).astype(np.uint8)
    out.append(os.path.join(folder, os.path.basename(p)))
    cache.write_npz(out[-1], record)
  return out


def _write_jpeg_scans(root: str, count: int, slices: int, size: int):
  from covid3d.bench.data import write_scans  # pylint: disable=import-outside-toplevel
  return write_scans(root, count, slices, size)


def _volume_caches(tmp: str, args, sizes) -> dict:
  """Cache dtype -> record paths: `args.records` records built at `sizes`, and the uint8 copy."""
  from covid3d.data import preprocess  # pylint: disable=import-outside-toplevel
  refs = _write_jpeg_scans(os.path.join(tmp, "small"), args.records, *RECORD_SOURCE)
  with contextlib.redirect_stdout(io.StringIO()):
    paths = preprocess.build_cache(refs, os.path.join(tmp, "cache"), sizes,
                                   workers=os.cpu_count(), progress=False)
  return {"float16": paths, "uint8": uint8_copy(paths, os.path.join(tmp, "cache_u8"))}


def _preprocess_row(tmp: str, args, sizes) -> dict:
  slices, rows, cols = (int(v) for v in args.scan.split("x"))
  if rows != cols:
    raise SystemExit(f"--scan {args.scan}: the synthetic slices are square")
  refs = _write_jpeg_scans(os.path.join(tmp, "ct"), args.scans, slices, rows)
  out = os.path.join(tmp, "preprocessed")
  got = in_fresh_process(_preprocess, refs=refs, out_dir=out, sizes=sizes)
  cubes = ", ".join(f"{s}^3" for s in sizes)
  records = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".npz")]
  return _row("preprocess", f"{args.scan} JPEG -> {cubes} float16", args.scans, "scans/s",
              _mean_file_bytes(records), got)


def _volume_rows(names, tmp: str, args, sizes) -> list[dict]:
  caches = _volume_caches(tmp, args, sizes)
  rows = []
  for name, (fields, volume_dtype, cached) in volume_stages(*sizes).items():
    if name not in names:
      continue
    paths = caches[cached]
    got = in_fresh_process(_stream_volumes, paths=paths, fields=fields,
                           volume_dtype=volume_dtype, batch=args.batch, batches=args.batches,
                           threads=args.threads, prefetch=args.prefetch,
                           device_put=args.device_put)
    arrays = " + ".join(f for f in fields.values() if f.startswith(("volume_", "mask_")))
    data = f"{arrays}, {cached} -> {volume_dtype or cached}"
    rows.append(_row(name, data, len(paths), "volumes/s", _mean_file_bytes(paths), got))
  return rows


def _imagenet_dir(tmp: str, args) -> str:
  """Writes ``args.images`` ImageNet-like JPEGs and prepares them; returns the TFDS data dir."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  from covid3d.bench.imagenet import write_manual_dir  # pylint: disable=import-outside-toplevel
  from covid3d.data import imagenet  # pylint: disable=import-outside-toplevel
  manual, data_dir = os.path.join(tmp, "manual"), os.path.join(tmp, "tfds")
  write_manual_dir(manual, args.images, val=1, classes=min(args.images, 100))
  tfds.display_progress_bar(False)
  imagenet.prepare(manual, data_dir)
  return data_dir


def _image_rows(names, tmp: str, args) -> list[dict]:
  data_dir = _imagenet_dir(tmp, args)
  records = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
             if "train.array_record" in f]
  cache_bytes = sum(os.path.getsize(p) for p in records) / args.images
  rows = []
  for name in [n for n in ("imagenet2d", "imagenet2d-u8") if n in names]:
    image_dtype = "uint8" if name.endswith("-u8") else "float32"
    got = in_fresh_process(_stream_images, data_dir=data_dir, size=args.image_size,
                           batch=args.image_batch, batches=args.image_batches,
                           threads=args.threads, prefetch=args.prefetch,
                           image_dtype=image_dtype, device_put=args.device_put)
    data = f"JPEG -> {args.image_size}^2 {image_dtype}, official recipe"
    rows.append(_row(name, data, args.images, "images/s", cache_bytes, got))
  return rows


def measure(args) -> list[dict]:
  """The rows of the stages in ``args.stages`` (see the module doc)."""
  names = args.stages.split(",")
  unknown = sorted(set(names) - set(STAGES))
  if unknown:
    raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
  sizes = tuple(int(s) for s in args.sizes.split(","))
  if len(sizes) != 2:
    raise SystemExit(f"--sizes {args.sizes}: give the large and the small cube size")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if "preprocess" in names:
      rows.append(_preprocess_row(tmp, args, sizes))
    if any(n in volume_stages(*sizes) for n in names):
      rows += _volume_rows(names, tmp, args, sizes)
    if any(n.startswith("imagenet2d") for n in names):
      rows += _image_rows(names, tmp, args)
  return rows


def run(args):
  from covid3d.bench.common import print_table  # pylint: disable=import-outside-toplevel
  print(f"host: {os.cpu_count()} cores; batch {args.batch} volumes / {args.image_batch} "
        f"images, {args.threads} threads, prefetch {args.prefetch}"
        f"{', device_put' if args.device_put else ''}")
  rows = measure(args)
  print_table(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"cores": os.cpu_count(), "rows": rows}, f, indent=1)
