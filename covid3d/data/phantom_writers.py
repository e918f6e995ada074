"""Write phantom scans in the layouts of the three real datasets.

* COV19-CT-DB (`write_cov19ctdb`): `train|validation/covid|non-covid/ct_scan_N/K.jpg`
  and `test/ct_scan_N/K.jpg`, one 8-bit JPEG per slice (lung window, gray stored
  as RGB, K = 0, 1, ... so lexical order differs from numeric order), and the
  severity CSVs `train_partition_covid_categories.csv` /
  `val_partition_covid_categories.csv` (`Name;Category`, semicolon separated,
  Category 1..4 = mild..critical, covid scans only) at the dataset root.
* COVID-19-20 lesion set (`write_lesions`): `Train/volume-covid19-A-NNNN_ct.nii.gz`
  (int16 HU) with `..._seg.nii.gz` (uint8 0/1) on the same grid.
* STOIC (`write_stoic`): `data/mha/<PatientID>.mha` (int16 HU) and
  `metadata/reference.csv` (`PatientID,probCOVID,probSevere`, 0/1 values).
* A DICOM series of any HU image (`write_dicom_series`): one CT file per
  slice, stored values HU + 1024 with rescale intercept -1024, as scanners do.

Every writer returns one record (dict) per scan with its ground truth, and
`write_all` also stores them in `phantom_manifest.json`. Geometry: the phantom
arrays are LPS with an identity direction (`covid3d.data.phantom`); the MHA
files keep that, the NIfTI affines are its RAS form, diag(-sx, -sy, sz).

`python -m covid3d.data.phantom_writers` writes the three datasets (`--out DIR`)
or the phantom's example figure (`--png FILE`, `phantom.plot_classes`).
"""

import argparse
import concurrent.futures
import csv
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np

from covid3d.data import phantom
from covid3d.data.read_common import HU_WINDOW
from covid3d.data.read_dicom import kept_locale

DATASETS = ("cov19ctdb", "lesions", "stoic")
# Root folder of each dataset under `write_all`'s root.
DATASET_DIRS = {"cov19ctdb": "cov19ctdb", "lesions": "covid19-20", "stoic": "stoic"}
PARTITIONS = (("train", 0.6), ("validation", 0.2), ("test", 0.2))
SEVERITY_CSVS = {"train": "train_partition_covid_categories.csv",
                 "validation": "val_partition_covid_categories.csv"}
MANIFEST = "phantom_manifest.json"
# Mis-orientations of whole COV19-CT-DB scans; each maps a (D, H, W) array.
MISORIENTATIONS = {
    "rot90": lambda a: np.rot90(a, 1, axes=(1, 2)),
    "rot270": lambda a: np.rot90(a, 3, axes=(1, 2)),
    "flip_rows": lambda a: a[:, ::-1],
    "flip_slices": lambda a: a[::-1],
}


def _scan_seed(seed, dataset, index):
  return (int(seed), DATASETS.index(dataset) + 1, int(index))


def _plan_rng(seed, dataset):
  return np.random.default_rng((int(seed), DATASETS.index(dataset) + 1, 1 << 20))


def _classes(rng, n, covid_share):
  """(kind, severity) for n scans: covid severities cycle 0..3, order shuffled."""
  n_covid = int(round(n * covid_share))
  classes = [("covid", i % 4) for i in range(n_covid)] + [("non-covid", None)] * (n - n_covid)
  return [classes[i] for i in rng.permutation(n)]


def _shape(rng, sizes, slices):
  size = int(rng.integers(sizes[0], sizes[1] + 1))
  return (int(rng.integers(slices[0], slices[1] + 1)), size, size)


def _pick(rng, n, share, exclude=()):
  """ceil(share * n) indices in range(n) (at least one when share > 0), avoiding `exclude`."""
  free = np.setdiff1d(np.arange(n), list(exclude))
  k = min(len(free), math.ceil(share * n)) if share > 0 else 0
  return set(rng.choice(free, size=k, replace=False).tolist())


def _lps_origin(rng, shape, spacing):
  """World (x, y, z) LPS mm of voxel (0, 0, 0): image centred in x/y, table height in z."""
  d, h, w = shape
  sz, sy, sx = spacing
  return (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy + float(rng.uniform(-20, 20)),
          -float(rng.uniform(150.0, 350.0)))


def _record(dataset, scan_id, path, info, **extra):
  rec = {"dataset": dataset, "scan_id": scan_id, "path": str(path), "covid": info["covid"],
         "severity": info["severity"], "lesion_fraction": info["lesion_fraction"],
         "nodules": info["nodules"], "spacing": list(info["spacing"]), "seed": info["seed"]}
  rec.update(extra)
  return rec


def _run(fn, tasks, workers):
  if workers <= 1:
    return [fn(t) for t in tasks]
  # Spawned, not forked: the caller may have started JAX's threads already.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    return list(pool.map(fn, tasks, chunksize=max(1, len(tasks) // (4 * workers))))


def jpeg_window(hu):
  """HU -> the uint8 grey values of the phantom's COV19-CT-DB JPEGs.

  The window is the HU clip the readers apply to the NIfTI and MHA datasets
  (``HU_WINDOW``, -1000 -> 0, +500 -> 255), so that the phantom's three
  datasets map a tissue to the same input value and a model trained on one
  (the lesion segmentation) transfers to the others (the pseudo-labels). With
  a lung window (L -600 / W 1500) instead, normal lung would reach the model
  at the value of ground glass in the lesion set (docs/phantom.md).
  """
  low, high = HU_WINDOW
  return phantom.lung_window(hu, level=(low + high) / 2, width=high - low)


def _write_jpeg_scan(task):
  from PIL import Image

  vol, _, info = phantom.make_scan(task["seed"], kind=task["kind"], severity=task["severity"],
                                   shape=task["shape"])
  img = jpeg_window(vol)
  if task["misorientation"]:
    img = MISORIENTATIONS[task["misorientation"]](img)
  folder = Path(task["root"]) / task["rel"]
  folder.mkdir(parents=True, exist_ok=True)
  bad_size = None
  for k, sl in enumerate(img):
    pic = Image.fromarray(np.ascontiguousarray(sl)).convert("RGB")
    if k == task["bad_slice"]:
      bad_size = (int(sl.shape[0] * 3 // 4), int(sl.shape[1] * 3 // 4))
      pic = pic.resize(bad_size[::-1], Image.BILINEAR)
    pic.save(folder / f"{k}.jpg", quality=task["quality"])
  return _record("cov19ctdb", task["rel"].name, task["rel"], info,
                 partition=task["partition"], shape=list(vol.shape), n_slices=len(img),
                 size=list(img.shape[1:]),
                 misorientation=task["misorientation"], inconsistent_slice=task["bad_slice"],
                 inconsistent_size=bad_size)


def write_cov19ctdb(root, n_scans, seed, *, sizes=(64, 128), slices=(40, 90),
                    covid_share=0.5, misoriented=0.1, inconsistent=0.1, quality=90,
                    workers=1):
  """Write a COV19-CT-DB-like set of JPEG slice folders and severity CSVs.

  Args:
    root: dataset root (created).
    n_scans: scans over all partitions (60 % train, 20 % validation, 20 % test).
    seed: int; the same seed writes the same files.
    sizes: (min, max) in-plane size in pixels (square slices).
    slices: (min, max) slices per scan.
    covid_share: share of covid scans per partition; covid severities are balanced.
    misoriented: share of scans turned by 90/270 degrees in-plane or flipped
      (rows or slice order), at least one when > 0.
    inconsistent: share of scans (not mis-oriented ones) with one slice written
      at 3/4 of the in-plane size, at least one when > 0.
    quality: JPEG quality.
    workers: processes (1: in this process).

  Returns:
    list of records, one per scan: 'partition', 'scan_id', 'path' (relative to
    root), 'covid', 'severity' (-1 for non-covid; the test labels are only here),
    'lesion_fraction', 'misorientation' (None or a MISORIENTATIONS key),
    'inconsistent_slice' (None or slice index), 'inconsistent_size', ...
  """
  root = Path(root)
  rng = _plan_rng(seed, "cov19ctdb")
  counts = [int(n_scans * share) for _, share in PARTITIONS]
  counts[0] += n_scans - sum(counts)
  misplaced = _pick(rng, n_scans, misoriented)
  broken = _pick(rng, n_scans, inconsistent, exclude=misplaced)
  tasks, i = [], 0
  for (partition, _), count in zip(PARTITIONS, counts, strict=True):
    numbers = rng.choice(max(10 * count, 20), size=count, replace=False)
    for number, (kind, severity) in zip(numbers, _classes(rng, count, covid_share), strict=True):
      shape = _shape(rng, sizes, slices)
      rel = Path(partition) / (kind if partition != "test" else "") / f"ct_scan_{number}"
      tasks.append({
          "root": str(root), "rel": rel, "partition": partition, "kind": kind,
          "severity": severity, "shape": shape, "seed": _scan_seed(seed, "cov19ctdb", i),
          "quality": quality,
          "misorientation": (str(rng.choice(sorted(MISORIENTATIONS))) if i in misplaced else None),
          "bad_slice": int(rng.integers(1, shape[0] - 1)) if i in broken else None})
      i += 1
  root.mkdir(parents=True, exist_ok=True)
  records = _run(_write_jpeg_scan, tasks, workers)
  for partition, name in SEVERITY_CSVS.items():
    rows = sorted((int(r["scan_id"].rsplit("_", 1)[1]), r["severity"] + 1) for r in records
                  if r["partition"] == partition and r["covid"])
    with open(root / name, "w", newline="") as f:
      writer = csv.writer(f, delimiter=";")
      writer.writerow(["Name", "Category"])
      writer.writerows((f"ct_scan_{n}", c) for n, c in rows)
  return records


def nifti_affine(spacing, origin):
  """RAS affine (4, 4) of an LPS identity-direction grid; voxel index order (x, y, z)."""
  sz, sy, sx = spacing
  ox, oy, oz = origin
  return np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1]], float)


def _write_nifti_pair(task):
  import nibabel as nib

  vol, mask, info = phantom.make_scan(task["seed"], kind="covid", severity=task["severity"],
                                      shape=task["shape"])
  rng = np.random.default_rng(task["seed"] + (7,))
  affine = nifti_affine(info["spacing"], _lps_origin(rng, vol.shape, info["spacing"]))
  data = np.round(vol).astype(np.int16).transpose(2, 1, 0)
  seg = mask.transpose(2, 1, 0)
  axis = task["stored_flip"]
  if axis is not None:
    # Same anatomy stored the other way along one axis; the affine follows.
    i = "xyz".index(axis)
    data, seg = np.flip(data, i), np.flip(seg, i)
    affine[:3, 3] += affine[:3, i] * (data.shape[i] - 1)
    affine[:3, i] *= -1
  folder = Path(task["root"]) / "Train"
  for array, suffix in ((data, "ct"), (seg, "seg")):
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, folder / f"{task['name']}_{suffix}.nii.gz")
  return _record("lesions", task["name"], Path("Train") / f"{task['name']}_ct.nii.gz", info,
                 shape=list(vol.shape), affine=affine.tolist(), stored_flip=axis)


def write_lesions(root, n, seed, *, sizes=(64, 128), slices=(54, 66), flipped=0.2, workers=1):
  """Write a COVID-19-20-like lesion set: `Train/volume-covid19-A-NNNN_{ct,seg}.nii.gz`.

  All scans are covid with balanced severities. Slices default to 54..66 for a
  slice spacing near the real 5 mm; in-plane spacing is the phantom's (about
  0.7 mm at size 512, 3-6 mm at the demo sizes). A share `flipped` of the scans
  (at least one when > 0) is stored reversed along x or z with the affine
  adjusted, so only a reader that follows the affine gets the same array.

  Returns:
    list of records ('scan_id', 'path' relative to root, 'severity',
    'lesion_fraction', 'affine', 'stored_flip' (None, 'x' or 'z'), ...).
  """
  root = Path(root)
  (root / "Train").mkdir(parents=True, exist_ok=True)
  rng = _plan_rng(seed, "lesions")
  numbers = np.sort(rng.choice(1000, size=n, replace=False)) if n <= 1000 else np.arange(n)
  flips = _pick(rng, n, flipped)
  severities = [s for _, s in _classes(rng, n, 1.0)]
  tasks = [{"root": str(root), "name": f"volume-covid19-A-{number:04d}", "severity": sev,
            "shape": _shape(rng, sizes, slices), "seed": _scan_seed(seed, "lesions", i),
            "stored_flip": str(rng.choice(["x", "z"])) if i in flips else None}
           for i, (number, sev) in enumerate(zip(numbers, severities, strict=True))]
  return _run(_write_nifti_pair, tasks, workers)


def _write_mha(task):
  import SimpleITK as sitk

  vol, _, info = phantom.make_scan(task["seed"], kind=task["kind"], severity=task["severity"],
                                   shape=task["shape"])
  rng = np.random.default_rng(task["seed"] + (7,))
  img = sitk.GetImageFromArray(np.round(vol).astype(np.int16))
  spacing = info["spacing"]
  img.SetSpacing(spacing[::-1])
  img.SetOrigin(_lps_origin(rng, vol.shape, spacing))
  img.SetDirection(np.eye(3).ravel().tolist())
  path = Path("data") / "mha" / f"{task['patient']}.mha"
  sitk.WriteImage(img, str(Path(task["root"]) / path), useCompression=True)
  severe = int(info["covid"] and info["severity"] >= 2)
  return _record("stoic", str(task["patient"]), path, info, shape=list(vol.shape),
                 origin=list(img.GetOrigin()), probCOVID=info["covid"], probSevere=severe)


def write_dicom_series(image, folder, *, series_uid="1.2.826.0.1.3680043.2.1125.7.1"):
  """Writes a SimpleITK int16 HU image as a DICOM series, one file per slice.

  Files are named in reverse slice order (``0.dcm`` is the top slice), so a
  reader must sort by the Image Position tags, not by file name.

  Returns:
    The file paths, slice 0 first.
  """
  import SimpleITK as sitk

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  direction = np.reshape(image.GetDirection(), (3, 3))
  orientation = "\\".join(f"{v:g}" for v in (*direction[:, 0], *direction[:, 1]))
  depth, paths = image.GetDepth(), []
  for k in range(depth):
    one = image[:, :, k]
    position = image.TransformIndexToPhysicalPoint((0, 0, k))
    for tag, value in (("0008|0060", "CT"), ("0020|000d", series_uid + ".0"),
                       ("0020|000e", series_uid), ("0020|0013", str(k + 1)),
                       ("0020|0032", "\\".join(f"{v:.6f}" for v in position)),
                       ("0020|0037", orientation), ("0018|0050", f"{image.GetSpacing()[2]:g}"),
                       ("0028|1052", "-1024"), ("0028|1053", "1")):
      one.SetMetaData(tag, value)
    path = folder / f"{depth - 1 - k}.dcm"
    writer.SetFileName(str(path))
    with kept_locale():
      writer.Execute(one)
    paths.append(str(path))
  return paths


def write_stoic(root, n, seed, *, sizes=(64, 128), slices=(40, 90), covid_share=0.6,
                workers=1):
  """Write a STOIC-like set: `data/mha/<PatientID>.mha` and `metadata/reference.csv`.

  probCOVID is 1 for covid scans; probSevere is 1 for covid scans of phantom
  severity severe or critical (2, 3), else 0.

  Returns:
    list of records ('scan_id' = PatientID, 'path', 'probCOVID', 'probSevere',
    'severity', 'lesion_fraction', 'origin', ...).
  """
  root = Path(root)
  (root / "data" / "mha").mkdir(parents=True, exist_ok=True)
  (root / "metadata").mkdir(parents=True, exist_ok=True)
  rng = _plan_rng(seed, "stoic")
  patients = rng.choice(max(10000, 2 * n), size=n, replace=False) + 1
  tasks = [{"root": str(root), "patient": int(pid), "kind": kind, "severity": sev,
            "shape": _shape(rng, sizes, slices), "seed": _scan_seed(seed, "stoic", i)}
           for i, (pid, (kind, sev))
           in enumerate(zip(patients, _classes(rng, n, covid_share), strict=True))]
  records = _run(_write_mha, tasks, workers)
  with open(root / "metadata" / "reference.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["PatientID", "probCOVID", "probSevere"])
    writer.writerows(sorted((int(r["scan_id"]), r["probCOVID"], r["probSevere"])
                            for r in records))
  return records


def write_all(root, seed, n_per_dataset, *, workers=1, **kwargs):
  """Write all three datasets under `root` and `root/phantom_manifest.json`.

  Args:
    root: folder; the datasets go to root/cov19ctdb, root/covid19-20, root/stoic.
    seed: int.
    n_per_dataset: scans per dataset (int), or a dict dataset name -> count.
    workers: processes per writer.
    **kwargs: extra keyword arguments for every writer (e.g. sizes, slices).

  Returns:
    dict dataset name ('cov19ctdb', 'lesions', 'stoic') -> Path of its root.
  """
  root = Path(root)
  counts = (n_per_dataset if isinstance(n_per_dataset, dict)
            else dict.fromkeys(DATASETS, n_per_dataset))
  unknown = set(counts) - set(DATASETS)
  if unknown:
    raise ValueError(f"write_all: unknown datasets {sorted(unknown)}; known: {DATASETS}")
  writers = {"cov19ctdb": write_cov19ctdb, "lesions": write_lesions, "stoic": write_stoic}
  roots, manifest = {}, {}
  for name, count in counts.items():
    roots[name] = root / DATASET_DIRS[name]
    manifest[name] = writers[name](roots[name], count, seed, workers=workers, **kwargs)
  with open(root / MANIFEST, "w") as f:
    json.dump({"seed": seed, "roots": {k: str(v) for k, v in roots.items()},
               "scans": manifest}, f, indent=1)
  return roots


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m covid3d.data.phantom_writers",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--png", help="write the example figure to this file")
  parser.add_argument("--out", help="write the three datasets under this folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--n", type=int, default=64, help="scans per dataset for --out")
  args = parser.parse_args(argv)
  if not (args.png or args.out):
    parser.error("give --png and/or --out")
  if args.png:
    phantom.plot_classes(args.png, seed=args.seed)
  if args.out:
    roots = write_all(args.out, args.seed, args.n)
    for name, root in roots.items():
      print(f"{name}: {root}")


if __name__ == "__main__":
  main()
