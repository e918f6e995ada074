"""Predicts severity or COVID for anyone's scans with a trained fold ensemble.

  python -m covid3d.infer --model=R/severity_segmia --out=OUT scan1.nii.gz scan2.mha dicom_dir/

``--model``: a finished ``severity`` or ``detection`` workdir; its folds (the
ones its config's ``predict.folds`` names, else all) form the ensemble, the mean
of their softmax. Or a file ``python -m covid3d.export`` wrote. Each scan: a
NIfTI, MetaImage or NRRD file, a folder holding a DICOM series (the largest, if
several), or a folder of ``<integer>.jpg`` or ``.png`` slices
(``covid3d.data.readers.read_path``). Each is preprocessed as the training
records were (HU clipped to [-1000, 500] and scaled to [0, 1], or 0..255 ->
[0, 1] for slice images; a cubic resampling to the model's cube).

Each scan is first checked from its header (at most ``--max-voxels`` voxels,
`covid3d.data.headers`) and then for what a chest CT is (CT modality, slices,
extent, an image with air, body and lungs: `covid3d.data.acceptance`); a scan
that fails gets its reasons as its error, or with ``--accept-any`` is predicted
with them in its ``warning``.

Writes ``OUT/predictions.csv``: ``scan`` (the path as given), one probability
column per class (``mild,moderate,severe,critical`` or ``non-covid,covid``),
``prediction``, ``fold_disagreement`` (empty when the folds agree:
`fold_disagreement`), ``warning`` and ``error`` (empty when the scan was
predicted); prints the same table. ``--lesions=DIR`` (a segmentation, segmia or multitask workdir)
adds ``OUT/<scan name>_lesions.nii.gz``, the lesion mask in the scan's own
geometry, and a ``lesion_fraction`` column (the mask's share of the scan's
voxels); ``--saliency`` adds ``OUT/<scan name>_saliency.nii.gz``, the Grad-CAM
of the predicted class (``covid3d.saliency``) in the scan's geometry. With
either, ``OUT/<scan name>.png`` shows the axial and the coronal slice with the
most lesion (else saliency): the lesion outline in red, the Grad-CAM as a heat
map. A scan that cannot be read gets its error and no probabilities,
the others are still predicted, and the exit status is 1 (0 when all
succeeded; 2 for a bad command line, scan path, OUT or model, said in one line;
the scan paths and OUT are checked before any model loads). Once the model is
loaded it prints the model card's one line (``covid3d.model_card``: what the
model was trained on; for the demo's phantom-trained models, that they are not
for real scans); loading a workdir's model the first time a layer shape is met
on this device logs one line per shape (the depthwise convolution's backend,
``covid3d.models.dwconv_tune``). Warnings that
SimpleITK prints while reading a scan come as one line each naming the scan.

Outputs never harm a file: OUT must be new or empty (``--overwrite`` lets the
outputs replace earlier ones there); each is written whole under a temporary
name and renamed, and never through a symbolic link (refused, naming it); an
output whose name is an input's gets the next free name (``<name>_2``); OUT may
not lie inside an input folder (a scan's or the model's). The table grows as
``OUT/predictions.partial.csv``, a row as each scan finishes, renamed
``predictions.csv`` when all are done; cells that a spreadsheet would run as a
formula get a leading ``'``.
"""
import argparse
import csv
import dataclasses
import io
import os
import stat
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from covid3d import export, model_card, saliency, storage
from covid3d.data import acceptance, headers, preprocess, read_common, readers, schema
from covid3d.inference import build, workdir
from covid3d.inference.teacher import teacher_params

PROG = "python -m covid3d.infer"
PREDICTIONS = "predictions.csv"
PARTIAL = "predictions.partial.csv"     # the table while scans are still being predicted
# What each scan may write, after its output name (--lesions, --saliency).
SCAN_OUTPUTS = (".png", "_lesions.nii.gz", "_saliency.nii.gz")
# The input's own suffixes, not kept in its output name.
INPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".dicom")
# Folds disagree when their classes differ or the predicted class's probability spans more.
DISAGREEMENT_SPREAD = 0.3
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class UserError(ValueError):
  """A command line that cannot run: a bad scan path or OUT (one line, exit status 2)."""


@dataclasses.dataclass
class Row:
  """One scan's line of ``predictions.csv``."""
  scan: str
  probs: np.ndarray | None = None
  lesion_fraction: float | None = None
  error: str = ""
  warning: str = ""        # acceptance problems predicted anyway (--accept-any), resampling
  disagreement: str = ""   # `fold_disagreement` of the folds' probabilities


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """Lesion probabilities of a segmentation model: ``fn(x)`` (s, s, s) for x (1, s, s, s, 1)."""
  fn: Callable
  input_size: int


def load_predictor(model) -> export.Predictor:
  """The Predictor of a fine-tuning workdir or of a file ``covid3d.export`` wrote.

  Raises:
    HandOffError: neither.
  """
  if Path(model).is_file():
    try:
      return export.load(model)
    except ValueError as e:
      raise workdir.HandOffError(str(e)) from None
  return export.workdir_predictor(*export.load_model(model))


def card_line(model, predictor: export.Predictor) -> str:
  """The model card's one line (``covid3d.model_card.headline``) of ``model``."""
  card = predictor.card if Path(model).is_file() else model_card.for_workdir(model)
  return model_card.headline(card) or f"{model} has no model card"


def load_segmenter(lesions_dir) -> Segmenter:
  """The EMA backbone and segmentation head of a segmentation, segmia or multitask workdir.

  Raises:
    HandOffError: another kind of workdir.
  """
  info = workdir.stage_info(lesions_dir)
  if info.get("stage") not in workdir.LESION_STAGES:
    raise workdir.HandOffError(
        f"{lesions_dir} ran the stage {info.get('stage')!r}: --lesions must be a finished "
        f"{', '.join(workdir.LESION_STAGES)} workdir")
  config = ml_collections.ConfigDict(info)
  config.init_from = str(lesions_dir)
  model = build.make_model(config, {}, segmentation=True)
  params = teacher_params(config, model)
  apply_fn = build.apply_fn(model, config, "segmentation")
  prob = jax.jit(lambda x: jax.nn.sigmoid(apply_fn(params, x, True, None)))
  return Segmenter(lambda x: np.asarray(prob(jnp.asarray(x)))[0, ..., 0],
                   min(config.data.sizes))


def output_name(path, taken: set, clashes: Callable[[str], bool] | None = None) -> str:
  """A file-name stem for ``path``'s outputs, unique among ``taken`` (which it joins).

  The input's format suffix (``.nii.gz``, ``.dcm``, ...) is dropped; a stem for
  which ``clashes(stem)`` is true (its outputs would land on an input) is skipped.
  """
  name = Path(path).name
  for suffix in INPUT_SUFFIXES:
    if name.lower().endswith(suffix):
      name = name[:-len(suffix)]
      break
  stem, k = name or "scan", 1
  while not name or name in taken or (clashes is not None and clashes(name)):
    k += 1
    name = f"{stem}_{k}"
  taken.add(name)
  return name


def output_names(paths, out, inputs=()) -> list[str]:
  """`output_name` of each of ``paths``: distinct, and none whose outputs (``SCAN_OUTPUTS``
  in ``out``) would be one of ``inputs`` (files, compared by their real paths)."""
  avoid = {os.path.realpath(p) for p in inputs}
  taken = set()

  def clashes(name):
    return any(os.path.realpath(Path(out) / f"{name}{s}") in avoid for s in SCAN_OUTPUTS)
  return [output_name(p, taken, clashes) for p in paths]


def scan_path_error(path) -> str:
  """Why ``path`` cannot be a scan before it is read ('' if it may be one): missing,
  unreadable, an empty folder, or neither a file nor a folder (a FIFO, a device)."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return "no such file or folder"
  except OSError as e:
    return read_common.os_reason(e, path)
  if stat.S_ISDIR(mode):
    try:
      with os.scandir(path) as entries:
        empty = next(entries, None) is None
    except OSError as e:
      return read_common.os_reason(e, path)
    return "empty folder" if empty else ""
  if not stat.S_ISREG(mode):
    return "neither a file nor a folder"
  if not os.access(path, os.R_OK):
    return "permission denied"
  return ""


def check_scans(paths) -> None:
  """Every scan path exists and can be read, before any model loads.

  Raises:
    UserError: one line per bad path, naming it.
  """
  bad = [f"scan {p}: {why}" for p in paths if (why := scan_path_error(p))]
  if bad:
    raise UserError("\n".join(bad))


def check_out(out: Path, inputs, overwrite: bool, names=None) -> None:
  """OUT can take the outputs without harming a file.

  OUT is new or an empty folder (or ``overwrite``); it is not an input folder
  (a scan's, the model's) nor inside one; no input is ``predictions.csv`` or its
  partial table there; no output there (``names``: the scans' output names) is a
  symbolic link.

  Raises:
    UserError: the one-line reason, naming the path.
  """
  if os.path.lexists(out) and not out.is_dir():
    raise UserError(f"--out {out} is not a folder: give a new or empty folder")
  if out.is_dir() and not overwrite:
    entries = sorted(p.name for p in out.iterdir())
    if entries:
      raise UserError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}): "
                      "give a new or empty folder, or --overwrite to replace the outputs there")
  real_out = os.path.realpath(out)
  for p in inputs:
    real = os.path.realpath(p)
    if os.path.isdir(real) and os.path.commonpath([real, real_out]) == real:
      raise UserError(f"--out {out} is inside the input folder {p}, which infer only reads: "
                      "write the outputs elsewhere")
    if real in {os.path.realpath(out / PREDICTIONS), os.path.realpath(out / PARTIAL)}:
      raise UserError(f"the input {p} is where the table goes: give another --out")
  outputs = [out / PREDICTIONS, out / PARTIAL]
  outputs += [out / f"{n}{s}" for n in names or () for s in SCAN_OUTPUTS]
  for o in outputs:
    try:
      storage.refuse_link(o)
    except storage.LinkRefused as e:
      raise UserError(str(e)) from None


def model_inputs(scan) -> Callable[[int], np.ndarray]:
  """``get(size)``: the model's float32 (1, s, s, s, 1) input of a Scan, as the training
  records hold it; each size is resampled once however many models read it."""
  cubes = {}

  def get(size: int) -> np.ndarray:
    if size not in cubes:
      record = preprocess.preprocess_scan(scan, (size,))
      cubes[size] = np.asarray(record[schema.volume_key(size)], np.float32)[None, ..., None]
    return cubes[size]
  return get


def segment(segmenter: Segmenter, scan, cube, out: Path, name: str) -> np.ndarray:
  """The lesion mask (uint8, scan grid); written as ``<name>_lesions.nii.gz`` (scan geometry)."""
  prob = preprocess.zoom_linear(segmenter.fn(cube(segmenter.input_size)), scan.volume.shape)
  mask = np.asarray(prob > 0.5, np.uint8)
  with storage.output_path(out / f"{name}_lesions.nii.gz") as tmp:
    readers.write_mask_like(mask, scan, tmp)
  return mask


def explain(cam_fn, predictor: export.Predictor, scan, cube, probs, out: Path, name: str):
  """Grad-CAM (scan grid, [0, 1]) of the predicted class; written as
  ``<name>_saliency.nii.gz`` in the scan's geometry (float32)."""
  heat = cam_fn(cube(predictor.input_size), [int(np.argmax(probs))])[0]
  heat = np.clip(preprocess.zoom_linear(heat, scan.volume.shape), 0.0, 1.0)
  with storage.output_path(out / f"{name}_saliency.nii.gz") as tmp:
    readers.write_image_like(heat, scan, tmp)
  return heat


def view_aspects(spacing) -> tuple[float, float]:
  """imshow aspects (a pixel's height / width) of the axial (H, W) and the coronal (D, W)
  views of a (D, H, W) volume with voxel ``spacing`` (z, y, x) mm: true physical shape."""
  z, y, x = (float(v) for v in spacing)
  return y / x, z / x


def plot_views(volume, path, title, mask=None, heat=None, spacing=(1.0, 1.0, 1.0)):
  """The axial and the coronal slice with the most lesion (else the most saliency, else the
  middle ones): the lesion outline in red, the Grad-CAM as a translucent heat map. Each view
  is drawn to the scale of the voxel ``spacing`` (z, y, x) mm; written whole as PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if heat is not None and np.ptp(heat) < 1e-6:
    # e.g. a 32^3 input: the last stage is one voxel, so the map is uniform.
    heat, title = None, f"{title} (Grad-CAM uniform: not drawn)"
  focus = mask if mask is not None and mask.any() else heat
  if focus is not None and focus.any():
    axial = int(np.argmax(focus.sum(axis=(1, 2))))
    coronal = int(np.argmax(focus.sum(axis=(0, 2))))
  else:
    axial, coronal = volume.shape[0] // 2, volume.shape[1] // 2
  views = ((f"axial slice {axial}", np.s_[axial]), (f"coronal row {coronal}", np.s_[::-1, coronal]))
  fig, axes = plt.subplots(1, 2, figsize=(8, 4))
  for ax, (label, where), aspect in zip(axes, views, view_aspects(spacing), strict=True):
    ax.imshow(volume[where], cmap="gray", vmin=0, vmax=1, aspect=aspect)
    if heat is not None:
      ax.imshow(heat[where], cmap="jet", alpha=0.35, vmin=0, vmax=1, aspect=aspect)
    if mask is not None and mask[where].any():
      ax.contour(mask[where], levels=[0.5], colors="red", linewidths=1)
    ax.set_title(label, fontsize=9)
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  with storage.output_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def fold_disagreement(fold_probs, names) -> str:
  """'' when the folds agree, else how they differ: their predicted classes differ, or the
  ensemble's class gets probabilities more than ``DISAGREEMENT_SPREAD`` apart.

  ``fold_probs``: (F, K) each fold's probabilities; None (an exported file) gives 'n/a'.
  """
  if fold_probs is None:
    return "n/a (an exported file holds the folds' mean only)"
  fold_probs = np.asarray(fold_probs)
  votes = np.argmax(fold_probs, axis=-1)
  if len(set(votes.tolist())) > 1:
    counts = np.bincount(votes, minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    return "folds predict " + ", ".join(f"{names[c]} ({counts[c]})" for c in order if counts[c])
  c = int(np.argmax(fold_probs.mean(axis=0)))
  lo, hi = fold_probs[:, c].min(), fold_probs[:, c].max()
  if hi - lo > DISAGREEMENT_SPREAD:
    return f"p({names[c]}) from {lo:.2f} to {hi:.2f} across the folds"
  return ""


def predict_scans(predictor: export.Predictor, paths, out: Path,
                  segmenter: Segmenter | None = None, cam_fn=None, names=None,
                  on_row: Callable[[list], None] | None = None, accept_any: bool = False,
                  max_voxels: int = headers.MAX_VOXELS) -> list[Row]:
  """Reads, checks and predicts each of ``paths`` (one at a time); a Row each, in order.

  A scan that cannot be a chest CT (`acceptance.problems`) gets those problems as its error,
  or, with ``accept_any``, is predicted with them in its warning. A scan of more than
  ``max_voxels`` voxels (from its header) is not read. With ``segmenter`` and/or ``cam_fn``
  (``saliency.ensemble_grad_cam``) each scan also gets its lesion mask / Grad-CAM volume and
  ``<name>.png``, ``names`` being the scans' output names (default `output_names`, which
  keeps them off the inputs). ``on_row(rows)`` is called with the rows so far as each scan
  finishes.
  """
  names = output_names(paths, out, paths) if names is None else names
  rows = []
  for path, name in zip(paths, names, strict=True):
    row = Row(str(path))
    rows.append(row)
    try:
      with read_common.library_messages(path):
        scan = readers.read_path(path, max_voxels=max_voxels)
      found = acceptance.problems(scan)
      if found and not accept_any:
        raise readers.DataError(path, "; ".join(found))
      row.warning = "; ".join([*found, *([scan.meta["resampled"]] if "resampled" in scan.meta
                                         else [])])
      cube = model_inputs(scan)
      if predictor.fold_fn is not None:
        fold_probs = predictor.fold_fn(cube(predictor.input_size))[:, 0]
        row.probs = fold_probs.mean(axis=0)
      else:
        fold_probs, row.probs = None, predictor.fn(cube(predictor.input_size))[0]
      row.disagreement = fold_disagreement(fold_probs, predictor.names)
      if segmenter is not None or cam_fn is not None:
        mask = segment(segmenter, scan, cube, out, name) if segmenter is not None else None
        heat = explain(cam_fn, predictor, scan, cube, row.probs, out, name) if cam_fn else None
        title = f"{name}: {predictor.names[int(np.argmax(row.probs))]}"
        if mask is not None:
          row.lesion_fraction = float(mask.mean())
          title += f", lesions {100 * row.lesion_fraction:.2f} % of the voxels"
        plot_views(scan.volume, out / f"{name}.png", title, mask, heat, scan.spacing)
    except readers.DataError as e:  # the path itself, or a file inside the folder
      row.error = e.reason if e.path == str(path) else str(e)
    except Exception as e:  # pylint: disable=broad-except  # one bad scan is its row's error
      row.error = f"{type(e).__name__}: {e}"
      row.probs = row.lesion_fraction = None
    if on_row is not None:
      on_row(rows)
  return rows


def safe_cell(value: str) -> str:
  """``value`` with a leading ``'`` if a spreadsheet would read it as a formula (it starts
  with one of ``FORMULA_STARTS``, as OWASP's CSV-injection advice lists)."""
  return f"'{value}" if value.startswith(FORMULA_STARTS) else value


def csv_text(rows, names, lesions=False) -> str:
  """``predictions.csv`` of ``rows`` (module doc), every text cell made safe (`safe_cell`)."""
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow([safe_cell(c) for c in ["scan", *names, "prediction",
                                     *(["lesion_fraction"] if lesions else []),
                                     "fold_disagreement", "warning", "error"]])
  for r in rows:
    lesion = [f"{r.lesion_fraction:.6f}" if r.lesion_fraction is not None else ""] \
        if lesions else []
    if r.probs is None:
      cells = [r.scan, *[""] * len(names), "", *lesion, "", r.warning, r.error]
    else:
      cells = [r.scan, *[f"{p:.6f}" for p in r.probs], names[int(np.argmax(r.probs))],
               *lesion, r.disagreement, r.warning, ""]
    w.writerow([safe_cell(c) for c in cells])
  return text.getvalue()


def write_csv(path, rows, names, lesions=False):
  """`csv_text` written whole at ``path`` (never through a link)."""
  storage.write_bytes(path, csv_text(rows, names, lesions).encode("utf-8"))


def table(rows, names) -> str:
  """The predictions as aligned text, one line per scan."""
  width = max(len("scan"), *(len(r.scan) for r in rows))
  cols = [max(len(n), 8) for n in names]
  lines = ["  ".join(["scan".ljust(width), *(n.rjust(c) for n, c in zip(names, cols, strict=True)),
                      "prediction"])]
  for r in rows:
    if r.probs is None:
      lines.append(f"{r.scan.ljust(width)}  error: {r.error}")
    else:
      lesion = "" if r.lesion_fraction is None else f"  lesions {100 * r.lesion_fraction:.2f} %"
      lines.append("  ".join([r.scan.ljust(width),
                              *(f"{p:.4f}".rjust(c) for p, c in zip(r.probs, cols, strict=True)),
                              names[int(np.argmax(r.probs))]]) + lesion)
      if r.disagreement and not r.disagreement.startswith("n/a"):
        lines.append(f"{' ' * width}  folds disagree: {r.disagreement}")
      if r.warning:
        lines.append(f"{' ' * width}  warning: {r.warning}")
  return "\n".join(lines)


def load_models(args):
  """(predictor, segmenter or None, Grad-CAM fn or None) the command line names.

  Raises:
    HandOffError: a bad model, or --saliency with an exported file.
    One of export.MODEL_ERRORS: a --model that cannot be read.
  """
  if args.saliency:
    config, ensemble = export.load_model(args.model)
    predictor = export.workdir_predictor(config, ensemble)
    cam_fn = saliency.ensemble_grad_cam(config, ensemble)
  else:
    predictor, cam_fn = load_predictor(args.model), None
  try:
    segmenter = load_segmenter(args.lesions) if args.lesions else None
  except export.MODEL_ERRORS as e:
    raise workdir.HandOffError(export.unreadable(args.lesions, e, "--lesions")) from None
  return predictor, segmenter, cam_fn


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a finished severity or detection workdir")
  parser.add_argument("--out", required=True,
                      help="a new or empty folder for predictions.csv (and the images)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty OUT, replacing earlier outputs of the same "
                      "names (never through a link, never onto an input)")
  parser.add_argument("--lesions", default="", metavar="DIR",
                      help="a segmentation, segmia or multitask workdir: also write each scan's "
                      "lesion mask (NIfTI, scan geometry), a PNG and a lesion_fraction column")
  parser.add_argument("--saliency", action="store_true",
                      help="also write each scan's Grad-CAM of the predicted class (last ConvNeXt "
                      "stage) as NIfTI in the scan's geometry, shown in the PNG (a workdir model)")
  parser.add_argument("--accept-any", action="store_true",
                      help="predict scans that fail the chest-CT checks too, their problems in "
                      "the warning column (docs/inference.md)")
  parser.add_argument("--max-voxels", type=int, default=headers.MAX_VOXELS, metavar="N",
                      help="refuse, from its header, a scan of more voxels than this "
                      f"(default {headers.MAX_VOXELS:,}: 1024x1024 pixels x 2000 slices)")
  parser.add_argument("scans", nargs="+", metavar="SCAN",
                      help="NIfTI/MetaImage/NRRD file, DICOM series folder or slice folder")
  args = parser.parse_args(argv)
  export.cli_logging()
  out = Path(args.out)
  inputs = [*args.scans, args.model, *([args.lesions] if args.lesions else [])]
  names = output_names(args.scans, out, inputs)
  try:
    if args.saliency and Path(args.model).is_file():
      raise workdir.HandOffError("--saliency needs the model's workdir (an exported file holds "
                                 "no gradients of the last stage)")
    check_out(out, inputs, args.overwrite, names if args.lesions or args.saliency else ())
    check_scans(args.scans)
  except UserError as e:   # one line per mistake
    print("\n".join(f"{PROG}: {line}" for line in str(e).splitlines()), file=sys.stderr)
    return 2
  except workdir.HandOffError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  try:
    predictor, segmenter, cam_fn = load_models(args)
    print(f"model: {card_line(args.model, predictor)}", flush=True)
  except export.MODEL_ERRORS as e:   # a model that is not one, or cannot be reached
    print(f"{PROG}: {export.unreadable(args.model, e)}", file=sys.stderr)
    return 2
  lesions = segmenter is not None
  try:
    out.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(out / PREDICTIONS):   # --overwrite: no finished-looking table of before
      os.unlink(out / PREDICTIONS)
    rows = predict_scans(
        predictor, args.scans, out, segmenter, cam_fn, names,
        on_row=lambda rows: write_csv(out / PARTIAL, rows, predictor.names, lesions),
        accept_any=args.accept_any, max_voxels=args.max_voxels)
    storage.move_output(out / PARTIAL, out / PREDICTIONS)
  except storage.LinkRefused as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  except OSError as e:   # OUT cannot be written (full, read-only)
    print(f"{PROG}: --out {out}: {read_common.os_reason(e)}", file=sys.stderr)
    return 2
  print(table(rows, predictor.names))
  failed = sum(r.error != "" for r in rows)
  print(f"{len(rows) - failed} of {len(rows)} scans predicted with {len(predictor.folds)} fold "
        f"model(s); {out / PREDICTIONS}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
