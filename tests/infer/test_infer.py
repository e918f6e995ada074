"""``covid3d.infer`` and ``covid3d.export`` on the chain's severity ensemble."""
import json
import re

import jax
import nibabel as nib
import numpy as np
import pytest

from covid3d.data import preprocess, readers

pytestmark = pytest.mark.slow   # the chain


def test_infer_gives_one_answer_per_volume_whatever_the_format(chain, tmp_path, capsys):
  """covid3d.infer on one HU volume as MetaImage, NIfTI, NRRD and a DICOM series, on a
  slice folder the predict stage predicted, and on a truncated file; a missing path stops
  the command before the models load."""
  import csv

  import SimpleITK as sitk

  from covid3d import infer
  from covid3d.data import phantom_writers
  mha = sorted((chain / "data" / "stoic" / "data" / "mha").glob("*.mha"))[0]
  image = sitk.ReadImage(str(mha))
  same = [mha, tmp_path / "scan.nii.gz", tmp_path / "scan.nrrd", tmp_path / "dicom"]
  sitk.WriteImage(image, str(same[1]))
  sitk.WriteImage(image, str(same[2]))
  phantom_writers.write_dicom_series(image, same[3])
  with open(chain / "severity" / "predictions_validation.csv") as f:
    predicted = next(csv.DictReader(f))
  slices = chain / "data" / "cov19ctdb" / "validation" / predicted["scan"]
  truncated = tmp_path / "truncated.nii.gz"
  truncated.write_bytes(same[1].read_bytes()[:2000])
  paths = [*same, slices, truncated]
  out = tmp_path / "out"
  missing = tmp_path / "nothing.mha"
  assert infer.main([f"--model={chain / 'severity'}", f"--out={out}", str(mha),
                     str(missing)]) == 2
  assert capsys.readouterr().err == (f"python -m covid3d.infer: scan {missing}: no such file or "
                                     "folder\n")
  assert not out.exists()
  rc = infer.main([f"--model={chain / 'severity'}", f"--out={out}",
                   f"--lesions={chain / 'segmentation'}", "--saliency", *map(str, paths)])
  assert rc == 1
  printed = capsys.readouterr().out
  # The fine-tuning stage's model card; its line comes first, saying what the model is not for.
  card = (chain / "severity" / "MODEL_CARD.md").read_text()
  assert "synthetic phantom" in card and "| fold | macro F1 |" in card
  assert printed.splitlines()[0].startswith("model: covid3d severity model")
  assert printed.splitlines()[0].endswith("not for real scans.")
  with open(out / "predictions.csv") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  names = ["mild", "moderate", "severe", "critical"]
  assert reader.fieldnames == ["scan", *names, "prediction", "lesion_fraction",
                               "fold_disagreement", "warning", "error"]
  assert not any(r["warning"] for r in rows)   # the phantom passes the chest-CT checks
  # Lesion masks in each scan's own geometry; one volume, one mask, whatever the format.
  fractions = [float(r["lesion_fraction"]) for r in rows[:5]]
  assert all(0.0 <= f <= 1.0 for f in fractions) and rows[5]["lesion_fraction"] == ""
  np.testing.assert_allclose(fractions[1:4], fractions[0], atol=1e-6)
  stems = [mha.stem, "scan", "scan_2", "dicom", slices.name]   # scan.nrrd: the second "scan"
  for stem in stems:
    assert (out / f"{stem}.png").stat().st_size > 1000, stem
  for stem in stems[:4]:
    assert nib.load(str(out / f"{stem}_lesions.nii.gz")).shape == image.GetSize(), stem
    heat = nib.load(str(out / f"{stem}_saliency.nii.gz"))
    assert heat.shape == image.GetSize(), stem
    assert np.isfinite(heat.get_fdata()).all() and 0 <= heat.get_fdata().min() <= 1, stem
  assert infer.main([f"--model={chain / 'severity'}", f"--out={tmp_path / 'o3'}",
                     f"--lesions={chain / 'severity'}", str(mha)]) == 2
  assert "--lesions must be a finished segmentation" in capsys.readouterr().err
  assert [r["scan"] for r in rows] == list(map(str, paths))
  probs = np.array([[float(r[n]) for n in names] for r in rows[:5]])
  assert not any(r["error"] for r in rows[:5])
  np.testing.assert_allclose(probs[1:4], np.repeat(probs[:1], 3, axis=0), atol=2e-6)
  np.testing.assert_allclose(probs[4], [float(predicted[f"p_{n}"]) for n in names], atol=2e-6)
  assert rows[4]["prediction"] == predicted["class"]
  assert "truncated" in rows[5]["error"] or "Error" in rows[5]["error"]
  assert rows[5]["mild"] == ""
  assert "5 of 6 scans predicted with 2 fold model(s)" in printed
  assert re.search(rf"{re.escape(str(paths[5]))} +error: ", printed)
  assert infer.main([f"--model={chain / 'pretrain2d'}", f"--out={tmp_path / 'o4'}",
                     str(mha)]) == 2
  assert "must be a finished severity or detection workdir" in capsys.readouterr().err

  # The exported ensemble: through infer, and with plain JAX as export's docstring shows.
  from covid3d import export
  exported = tmp_path / "severity.covid3d"
  assert export.main([f"--model={chain / 'severity'}", f"--out={exported}"]) == 0
  assert infer.main([f"--model={exported}", f"--out={tmp_path / 'out2'}",
                     *map(str, paths[3:5])]) == 0
  with open(tmp_path / "out2" / "predictions.csv") as f:
    again = np.array([[float(r[n]) for n in names] for r in csv.DictReader(f)])
  np.testing.assert_allclose(again, probs[3:5], atol=2e-6)
  import zipfile
  z = zipfile.ZipFile(exported)
  assert z.read("MODEL_CARD.md").decode() == card
  f = jax.export.deserialize(bytearray(z.read("model.stablehlo")))
  params = np.load(z.open("params.npz"))
  leaves = tuple(params[k] for k in sorted(params.files))
  size = json.loads(z.read("meta.json"))["input_size"]
  x = np.stack([preprocess.preprocess_scan(readers.read_path(p), (size,))[f"volume_{size}"]
                for p in paths[3:5]]).astype(np.float32)[..., None]
  np.testing.assert_allclose(np.asarray(f.call(leaves, x)), probs[3:5], atol=2e-6)
  assert infer.main([f"--model={exported}", "--saliency",
                     f"--out={tmp_path / 'o5'}", str(mha)]) == 2
  assert "--saliency needs the model's workdir" in capsys.readouterr().err
