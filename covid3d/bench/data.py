"""``python -m covid3d.bench data``: reading + preprocessing throughput and cache reads.

Writes a few COV19-CT-DB-like scans (``--slices`` JPEG slices of ``--size``^2
pixels, textured so they compress like CT slices) to a temporary folder, then
measures, per row: the scans/s of `build_cache` (read JPEGs, resample to each
cube size, write the cache) serially and with ``--workers`` processes (their
start-up included), the split of one serial scan into reading and resampling,
and the cache's read throughput (records/s and GB/s into host memory; the
files were just written, so this is the page-cached figure, i.e. the upper
bound a local SSD approaches; the record's memory-mapped arrays are copied
into memory, every cube size). Wall and CPU seconds (this process plus its
finished workers) are both given: on a shared machine the CPU seconds per scan
are the steadier figure. ``--zoom`` adds one `scipy.ndimage.zoom`
(order 3) for comparison with our separable resampler.
"""
import os
import tempfile
import time

import numpy as np
import scipy.ndimage

from covid3d.bench.common import print_table


def register(subparsers):
  p = subparsers.add_parser("data", help="read + preprocess scans/s, cache read throughput")
  p.add_argument("--scans", type=int, default=4, help="scans to generate")
  p.add_argument("--slices", type=int, default=160, help="JPEG slices per scan")
  p.add_argument("--size", type=int, default=512, help="in-plane size in pixels")
  p.add_argument("--sizes", default="256,224", help="cube sizes, comma separated")
  p.add_argument("--workers", type=int, default=2, help="processes of the parallel run")
  p.add_argument("--reads", type=int, default=3, help="passes over the cache when reading")
  p.add_argument("--zoom", action="store_true", help="also time scipy.ndimage.zoom once")
  p.set_defaults(func=run)


def write_scans(root, scans, slices, size, seed=0):
  """COV19-CT-DB-like JPEG folders under root/test; returns their ScanRefs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from covid3d.data import readers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  body = (xx ** 2 / 0.2 + yy ** 2 / 0.12) < 1
  lungs = body & ((np.abs(xx) - 0.18) ** 2 / 0.012 + yy ** 2 / 0.05 < 1)
  for s in range(scans):
    folder = os.path.join(root, "test", f"ct_scan_{s}")
    os.makedirs(folder)
    texture = rng.normal(0, 12, (slices, size, size)).astype(np.float32)
    for k in range(slices):
      img = np.where(body, 140.0, 5.0) - np.where(lungs, 110.0, 0) + texture[k]
      pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB")
      pic.save(os.path.join(folder, f"{k}.jpg"), quality=90)
  return readers.list_cov19ctdb(root, "test")


def _cpu_seconds():
  """CPU time of this process and its finished children (user + system)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _timed(fn):
  """(fn(), wall seconds, CPU seconds incl. finished worker processes)."""
  t, c = time.perf_counter(), _cpu_seconds()
  out = fn()
  return out, time.perf_counter() - t, _cpu_seconds() - c


def _row(step, wall, cpu, n=1, unit="scans/s"):
  return {"step": step, "wall_s": wall, "cpu_s": cpu, "per_s": n / wall, "unit": unit}


def run(args):
  from covid3d.data import preprocess, readers  # pylint: disable=g-import-not-at-top
  sizes = tuple(int(s) for s in args.sizes.split(","))
  print(f"host: {os.cpu_count()} cores; {args.scans} scans of {args.slices} x "
        f"{args.size}^2 JPEG slices -> {sizes}")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    refs, gen_s, _ = _timed(lambda: write_scans(tmp, args.scans, args.slices, args.size))
    mb = sum(os.path.getsize(p) for r in refs for p in r.paths) / len(refs) / 1e6
    print(f"generated in {gen_s:.1f} s ({mb:.1f} MB of JPEG per scan)")
    scan, *t = _timed(lambda: readers.load_scan(refs[0]))
    rows.append(_row("read one scan (JPEG decode)", *t))
    for s in sizes:
      _, *t = _timed(lambda: preprocess.resample(scan.volume, (s, s, s)))
      rows.append(_row(f"resample one scan to {s}^3", *t))
    if args.zoom:
      s = sizes[0]
      _, *t = _timed(lambda: scipy.ndimage.zoom(
          scan.volume, np.divide((s, s, s), scan.volume.shape), order=3, mode="mirror",
          grid_mode=False))
      rows.append(_row(f"scipy.ndimage.zoom to {s}^3", *t))
    paths = None
    for workers in (1, args.workers):
      cache_dir = os.path.join(tmp, f"cache{workers}")
      paths, *t = _timed(lambda: preprocess.build_cache(refs, cache_dir, sizes, workers=workers,
                                                        progress=False))
      rows.append(_row(f"build_cache, workers={workers}", *t, n=len(refs)))
    nbytes = sum(v.nbytes for v in preprocess.read_record(paths[0]).values()
                 if isinstance(v, np.ndarray))
    n = args.reads * len(paths)
    copied = lambda p: {k: np.array(v) for k, v in preprocess.read_record(p).items()}
    _, wall, cpu = _timed(lambda: [copied(p) for _ in range(args.reads) for p in paths])
    rows.append(_row("read_record + copy of every array (page-cached)", wall, cpu, n,
                     f"records/s, {n * nbytes / wall / 1e9:.2f} GB/s"))
  print_table(rows)
