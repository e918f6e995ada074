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

Writes ``OUT/predictions.csv``: ``scan`` (the path as given), one probability
column per class (``mild,moderate,severe,critical`` or ``non-covid,covid``),
``prediction`` and ``error`` (empty when the scan was predicted); prints the
same table. A scan that cannot be read gets its error and no probabilities,
the others are still predicted, and the exit status is 1 (0 when all
succeeded; 2 for a bad command line or model).
"""
import argparse
import csv
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np

from covid3d import export
from covid3d.data import preprocess, readers, schema
from covid3d.stages import handoff

PROG = "python -m covid3d.infer"


@dataclasses.dataclass
class Row:
  """One scan's line of ``predictions.csv``."""
  scan: str
  probs: np.ndarray | None = None
  error: str = ""


def load_predictor(model) -> export.Predictor:
  """The Predictor of a fine-tuning workdir or of a file ``covid3d.export`` wrote.

  Raises:
    HandOffError: neither.
  """
  if Path(model).is_file():
    try:
      return export.load(model)
    except ValueError as e:
      raise handoff.HandOffError(str(e)) from None
  return export.workdir_predictor(*export.load_model(model))


def read_scans(paths, size: int) -> tuple[list[Row], list[np.ndarray]]:
  """A Row per path; the (s, s, s) float32 volumes of those that could be read."""
  rows, volumes = [], []
  for path in paths:
    row = Row(str(path))
    rows.append(row)
    try:
      record = preprocess.preprocess_scan(readers.read_path(path), (size,))
      volumes.append(np.asarray(record[schema.volume_key(size)], np.float32))
    except readers.DataError as e:  # the path itself, or a file inside the folder
      row.error = e.reason if e.path == str(path) else str(e)
    except Exception as e:  # pylint: disable=broad-except  # one bad scan is its row's error
      row.error = f"{type(e).__name__}: {e}"
  return rows, volumes


def predict_scans(predictor: export.Predictor, paths, batch_size: int = 4) -> list[Row]:
  """Reads and predicts each of ``paths``; a Row each, in order."""
  rows, volumes = read_scans(paths, predictor.input_size)
  probs = []
  for start in range(0, len(volumes), batch_size):
    chunk = volumes[start:start + batch_size]
    x = np.zeros((batch_size,) + chunk[0].shape + (1,), np.float32)  # one shape: one compile
    x[:len(chunk), ..., 0] = chunk
    probs += list(predictor.fn(x)[:len(chunk)])
  for row in (r for r in rows if not r.error):
    row.probs = probs.pop(0)
  return rows


def write_csv(path, rows, names):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["scan", *names, "prediction", "error"])
    for r in rows:
      if r.probs is None:
        w.writerow([r.scan, *[""] * len(names), "", r.error])
      else:
        w.writerow([r.scan, *[f"{p:.6f}" for p in r.probs], names[int(np.argmax(r.probs))], ""])


def table(rows, names) -> str:
  """The predictions as aligned text, one line per scan."""
  width = max(len("scan"), *(len(r.scan) for r in rows))
  cols = [max(len(n), 8) for n in names]
  lines = ["  ".join(["scan".ljust(width), *(n.rjust(c) for n, c in zip(names, cols)),
                      "prediction"])]
  for r in rows:
    if r.probs is None:
      lines.append(f"{r.scan.ljust(width)}  error: {r.error}")
    else:
      lines.append("  ".join([r.scan.ljust(width),
                              *(f"{p:.4f}".rjust(c) for p, c in zip(r.probs, cols)),
                              names[int(np.argmax(r.probs))]]))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a finished severity or detection workdir")
  parser.add_argument("--out", required=True, help="folder for predictions.csv")
  parser.add_argument("scans", nargs="+", metavar="SCAN",
                      help="NIfTI/MetaImage/NRRD file, DICOM series folder or slice folder")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  try:
    predictor = load_predictor(args.model)
  except handoff.HandOffError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  rows = predict_scans(predictor, args.scans)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "predictions.csv", rows, predictor.names)
  print(table(rows, predictor.names))
  failed = sum(r.error != "" for r in rows)
  print(f"{len(rows) - failed} of {len(rows)} scans predicted with {len(predictor.folds)} fold "
        f"model(s); {out / 'predictions.csv'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
