"""``python -m covid3d.bench memory``: peak host memory and input rate of each stage's host side.

Writes synthetic data of the real shapes to a temporary folder:

* ``--scans`` COV19-CT-DB-like scans of ``--scan`` (slices x rows x columns)
  8-bit JPEG slices, a CT-size scan (`covid3d.bench.data.write_scans`);
* record caches of ``--records`` scans at the cube sizes ``--sizes``, built
  by `preprocess.build_cache` from small scans (the records have the real
  shapes, and their content does not change the read rate): COV19-CT-DB-like
  JPEG scans (32 slices of 128^2; no masks) with pseudo-label mask files
  beside them as the pseudolabel stage writes them (a ball of lesion), and a
  phantom lesion set (NIfTI volumes with masks), in the stages' record dtype
  (``data.record_dtype``, or ``--record-dtype``);
* ``--images`` ImageNet-like JPEGs (mostly 500 x 375) prepared as the TFDS
  ``imagenet2012`` array_record dataset (`covid3d.bench.imagenet`).

Then runs the host side of each stage in a fresh (spawned) process, so its
peak resident memory (VmHWM, the kernel's high-water mark of the
process's RSS, imports included) is that stage's own:

* ``preprocess``: `build_cache` of the CT-size scans to every cube size in
  one process (``--config.data.workers`` such processes run at once: a host
  needs workers x this);
* ``severity-train``, ``segmentation-train``, ``multitask-train``: the
  stage's own training batches, made by its own code from its full-size
  config (``configs/<stage>.py``): its fields (``inputs.batch_fields``,
  ``segmentation.train_fields``, ``multitask.train_fields``: the model input,
  the crop source when ``augment.crop.p > 0``, masks, labels), its volume
  dtype (as cached) and its iterator (``inputs.iterators``; multitask's
  masks from the pseudo-label files, ``inputs.with_pseudo_labels``), with
  ``--batch`` volumes a batch and ``--threads`` reader threads;
* ``floor``: what copying costs at least. For each volume a 224^3 and a 256^3
  uint8 cube (at ``--sizes``) copied from memory-mapped ``.npy`` files in the
  page cache into fresh batch buffers of ``--batch``, by 2 threads. Run
  whenever a ``*-train`` row is, in the same run;
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
before the work), peak_MiB, per_s and unit, per_cpu_s (items per CPU second
of the process, all its threads: the steadier figure on a shared machine,
where the wall rate depends on the share of the cores a process gets),
cache_MB (bytes per item of the
files read: the record's arrays the stage batches, and its pseudo-label
file) and batch_MB (bytes per item of the host batch). This module imports
no JAX at import time, so a stage process holds only what its stage imports.
"""
import contextlib
import io
import json
import multiprocessing
import os
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
  p.add_argument("--prefetch", type=int, default=4, help="batches read ahead (imagenet2d; the "
                 "3-D stages read ahead as they do in training)")
  p.add_argument("--record-dtype", default=None, choices=("float16", "uint8"),
                 help="the 3-D stages' record dtype (default: their config's data.record_dtype)")
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
  t = _clock()
  with contextlib.redirect_stdout(io.StringIO()):  # its summary line
    preprocess.build_cache(refs, out_dir, sizes, workers=1, progress=False)
  return {"items": len(refs), **_since(t), "base": base}


def _clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict:
  """{'seconds': wall, 'cpu_seconds': this process's CPU time, all threads} since `_clock()`."""
  return {"seconds": time.perf_counter() - start[0], "cpu_seconds": time.process_time() - start[1]}


def _timed_batches(ds, batches: int, device_put: bool) -> dict:
  """Reads one batch of ``ds``, then times ``batches`` more.

  Returns:
    {'items' (examples timed), 'seconds', 'cpu_seconds' (`_since`), 'batch_bytes' (per
    example, all arrays)}.
  """
  put = lambda batch: batch
  if device_put:
    import jax  # pylint: disable=import-outside-toplevel
    put = lambda batch: jax.block_until_ready(jax.device_put(batch))
  it = iter(ds)
  first = put(next(it))
  b = len(first["record_index"])
  t = _clock()
  for _ in range(batches):
    put(next(it))
  return {"items": b * batches, **_since(t),
          "batch_bytes": sum(v.nbytes for v in first.values()) / b}


# The 3-D stages whose training input is measured: row -> (config, records streamed). Multitask's
# STOIC records are stood in for by the COV19-CT-DB-like ones (the same arrays: volumes, no masks).
TRAIN_ROWS = {"severity-train": ("severity", "cov19ctdb"),
              "segmentation-train": ("segmentation", "lesions"),
              "multitask-train": ("multitask", "cov19ctdb")}


def stage_config(row: str, sizes, batch: int, threads: int, record_dtype=None):
  """The full-size config of the stage of ``row``, at the benchmark's sizes, batch and threads."""
  from covid3d import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load(TRAIN_ROWS[row][0])
  config.data.sizes = tuple(sizes)
  config.train.batch_size = batch
  config.data.loader_threads = threads
  if record_dtype:
    config.data.record_dtype = record_dtype
  return config


def stage_fields(row: str, config) -> dict:
  """Batch key -> record field of the training batches of the stage of ``row``, by its code."""
  from covid3d.inference import workdir  # pylint: disable=import-outside-toplevel
  from covid3d.stages import inputs, multitask, segmentation  # pylint: disable=import-outside-toplevel
  if row == "severity-train":
    return inputs.batch_fields(config, label=workdir.target("severity").label)
  stage = {"segmentation-train": segmentation, "multitask-train": multitask}[row]
  return stage.train_fields(config)


def stage_train_input(row: str, config, paths, pseudo_dir: str | None = None):
  """The training iterator of the stage of ``row`` over the records at ``paths``.

  The stage's own code: its fields (`stage_fields`), the records' dtype as
  cached, its iterator; multitask's masks from the pseudo-label files in
  ``pseudo_dir``.
  """
  # pylint: disable=import-outside-toplevel
  from covid3d.data import pipeline
  from covid3d.stages import inputs
  source = pipeline.file_source(paths)
  if row == "multitask-train":
    source = inputs.with_pseudo_labels(source, pseudo_dir, "stoic")
  train_iter, _ = inputs.iterators(config, source, np.arange(len(paths)), np.arange(0),
                                   stage_fields(row, config))
  return train_iter


def _stream_stage(row: str, config, paths, pseudo_dir, batches: int, device_put: bool) -> dict:
  """A 3-D stage's training batches (`stage_train_input`), timed as `_timed_batches`.

  Returns `_timed_batches`'s dict plus 'base', the RSS in bytes before the first read.
  """
  train_iter = stage_train_input(row, config, paths, pseudo_dir)
  base = rss.memory()["VmRSS"]
  return {"base": base, **_timed_batches(train_iter, batches, device_put)}


def _copy_floor(files, batch: int, batches: int, threads: int = 2) -> dict:
  """``batches`` batches of ``batch`` volumes, each volume its ``files`` pair of .npy cubes.

  Each volume's cubes are memory-mapped and copied into fresh batch buffers,
  ``threads`` threads sharing the batches; timed after one untimed batch.
  """
  from covid3d.data import cache  # pylint: disable=import-outside-toplevel

  def one_batch(b):
    picked = [files[(b * batch + j) % len(files)] for j in range(batch)]
    first = [cache.read_array(p) for p in picked[0]]
    buffers = [np.empty((batch,) + a.shape, a.dtype) for a in first]
    for j, pair in enumerate(picked):
      for buffer, p in zip(buffers, pair, strict=True):
        buffer[j] = cache.read_array(p)
    return sum(b.nbytes for b in buffers) / batch

  base = rss.memory()["VmRSS"]
  batch_bytes = one_batch(0)
  t = _clock()
  with futures.ThreadPoolExecutor(threads) as ex:
    list(ex.map(one_batch, range(1, batches + 1)))
  return {"base": base, "items": batch * batches, **_since(t), "batch_bytes": batch_bytes}


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

STAGES = ("preprocess", "floor", *TRAIN_ROWS, "imagenet2d", "imagenet2d-u8")


def _row(stage: str, data: str, records: int, unit: str, cache_bytes: float,
         got: dict) -> dict:
  mib = 2 ** 20
  return {"stage": stage, "data": data, "records": records, "base_MiB": got["base"] / mib,
          "peak_MiB": got["peak"] / mib, "per_s": got["items"] / got["seconds"],
          "per_cpu_s": got["items"] / got["cpu_seconds"], "unit": unit,
          "cache_MB": cache_bytes / 1e6, "batch_MB": got.get("batch_bytes", float("nan")) / 1e6}


def _mean_file_bytes(paths) -> float:
  return sum(os.path.getsize(p) for p in paths) / len(paths)


def _write_jpeg_scans(root: str, count: int, slices: int, size: int):
  from covid3d.bench.data import write_scans  # pylint: disable=import-outside-toplevel
  return write_scans(root, count, slices, size)


def _build(refs, folder: str, sizes, dtype: str) -> list[str]:
  from covid3d.data import preprocess  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(io.StringIO()):
    return preprocess.build_cache(refs, folder, sizes, workers=os.cpu_count(), progress=False,
                                  dtype=dtype)


def _write_pseudo_labels(paths, folder: str):
  """A pseudo-label mask file per record, as the pseudolabel stage writes them (a ball)."""
  # pylint: disable=import-outside-toplevel
  from covid3d import storage
  from covid3d.data import pipeline
  from covid3d.stages import inputs
  source = pipeline.file_source(paths)
  masks = {}
  for s in sorted({int(k.removeprefix("volume_")) for k in source.records[0]
                   if k.startswith("volume_")}):
    grid = np.linspace(-1, 1, s, dtype=np.float32)
    masks[f"mask_{s}"] = ((grid[:, None, None] - 0.3) ** 2 + grid[None, :, None] ** 2
                          + grid[None, None, :] ** 2 < 0.1).astype(np.uint8)
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **masks)
  for entry in source.index:
    storage.write_bytes(os.path.join(folder, "masks", "stoic", f"{inputs.file_stem(entry)}.npz"),
                        buffer.getvalue())
  return folder


def _record_caches(tmp: str, args, sizes, rows: dict) -> tuple[dict, dict]:
  """(dataset, dtype) -> record paths, dtype -> pseudo-label folder, for ``rows`` (row -> config).

  COV19-CT-DB-like records from small JPEG scans, lesion records (with masks)
  from a small phantom lesion set, and pseudo-label files for multitask.
  """
  from covid3d.data import phantom_writers, readers  # pylint: disable=import-outside-toplevel
  needed = {(TRAIN_ROWS[row][1], c.data.record_dtype) for row, c in rows.items()}
  refs = {}
  if any(name == "cov19ctdb" for name, _ in needed):
    refs["cov19ctdb"] = _write_jpeg_scans(os.path.join(tmp, "small"), args.records,
                                          *RECORD_SOURCE)
  if any(name == "lesions" for name, _ in needed):
    phantom_writers.write_lesions(os.path.join(tmp, "lesions"), args.records, 0,
                                  sizes=(RECORD_SOURCE[1],) * 2, slices=(RECORD_SOURCE[0],) * 2)
    refs["lesions"] = readers.list_lesions(os.path.join(tmp, "lesions"))
  caches = {(name, dtype): _build(refs[name], os.path.join(tmp, f"cache_{name}_{dtype}"), sizes,
                                  dtype) for name, dtype in needed}
  pseudo = {c.data.record_dtype: _write_pseudo_labels(
      caches["cov19ctdb", c.data.record_dtype], os.path.join(tmp, f"pseudo_{c.data.record_dtype}"))
            for row, c in rows.items() if row == "multitask-train"}
  return caches, pseudo


def _preprocess_row(tmp: str, args, sizes) -> dict:
  slices, rows, cols = (int(v) for v in args.scan.split("x"))
  if rows != cols:
    raise SystemExit(f"--scan {args.scan}: the synthetic slices are square")
  refs = _write_jpeg_scans(os.path.join(tmp, "ct"), args.scans, slices, rows)
  out = os.path.join(tmp, "preprocessed")
  got = in_fresh_process(_preprocess, refs=refs, out_dir=out, sizes=sizes)
  cubes = ", ".join(f"{s}^3" for s in sizes)
  records = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".npy")]
  return _row("preprocess", f"{args.scan} JPEG -> {cubes} float16", args.scans, "scans/s",
              sum(os.path.getsize(p) for p in records) / args.scans, got)


def _read_bytes(path, fields) -> int:
  """Bytes of the record's array files of ``fields`` (an absent mask reads none)."""
  from covid3d.data import cache  # pylint: disable=import-outside-toplevel
  files = [cache.array_file(path, f) for f in fields if f.startswith(("volume_", "mask_"))]
  return sum(os.path.getsize(f) for f in files if os.path.exists(f))


def _floor_row(tmp: str, args, sizes) -> dict:
  """The `floor` row: uint8 cubes of both sizes, one .npy pair per record, read once first."""
  folder = os.path.join(tmp, "floor")
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  files = []
  for i in range(args.records):
    files.append([os.path.join(folder, f"{i}_{s}.npy") for s in sorted(sizes)])
    for p, s in zip(files[-1], sorted(sizes), strict=True):
      np.save(p, rng.integers(0, 256, (s, s, s), np.uint8))
  got = in_fresh_process(_copy_floor, files=files, batch=args.batch, batches=args.batches)
  cubes = " + ".join(f"{s}^3" for s in sorted(sizes))
  cache_bytes = sum(os.path.getsize(p) for p in files[0])
  return _row("floor", f"{cubes} uint8 .npy, mmap -> fresh batch, 2 threads", args.records,
              "volumes/s", cache_bytes, got)


def _train_rows(names, tmp: str, args, sizes) -> list[dict]:
  configs = {row: stage_config(row, sizes, args.batch, args.threads, args.record_dtype)
             for row in TRAIN_ROWS if row in names}
  caches, pseudo = _record_caches(tmp, args, sizes, configs)
  rows = []
  for row, config in configs.items():
    dtype = config.data.record_dtype
    paths = caches[TRAIN_ROWS[row][1], dtype]
    got = in_fresh_process(_stream_stage, row=row, config=config, paths=paths,
                           pseudo_dir=pseudo.get(dtype), batches=args.batches,
                           device_put=args.device_put)
    arrays = [f for f in stage_fields(row, config).values() if f.startswith(("volume_", "mask_"))]
    cache_bytes = sum(_read_bytes(p, arrays) for p in paths) / len(paths)
    if row == "multitask-train":
      masks = os.path.join(pseudo[dtype], "masks", "stoic")
      cache_bytes += _mean_file_bytes([os.path.join(masks, f) for f in os.listdir(masks)])
    data = f"{' + '.join(arrays)}, {dtype} as cached"
    rows.append(_row(row, data, len(paths), "volumes/s", cache_bytes, got))
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
    if "floor" in names or any(n in TRAIN_ROWS for n in names):
      rows.append(_floor_row(tmp, args, sizes))
    if any(n in TRAIN_ROWS for n in names):
      rows += _train_rows(names, tmp, args, sizes)
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
