"""``covid3d.infer`` and ``covid3d.export`` outputs never harm a file: a new or empty OUT, whole
files, no links followed, no input overwritten, a table that says when it is unfinished, cells
a spreadsheet does not run; and the user errors said in one line before any model loads.

The model is a tiny exported ensemble (``export.pack`` of a few statistics of the cube), so
these tests run in seconds; the scans are phantom volumes written by SimpleITK, and a NIfTI
file that nibabel ships.
"""
import csv
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel
import numpy as np
import pytest

from covid3d import export, infer, storage
from covid3d.data import phantom

REPO = Path(__file__).resolve().parents[2]
NAMES = ("mild", "moderate", "severe", "critical")
SIZE = 16
PUBLIC_NIFTI = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
CARD = "# Model card\n\nIn one line: a tiny test ensemble of cube statistics, not for real scans.\n"


def _tiny_ensemble(leaves, x):
  """Probabilities (B, K) from three statistics of each cube x (B, s, s, s, 1) in [0, 1]."""
  w, b = leaves
  flat = x.reshape(x.shape[0], -1)
  stats = jnp.stack([flat.mean(1), (flat < 0.3).mean(1), (flat > 0.5).mean(1)], axis=-1)
  return jax.nn.softmax(stats @ w + b, axis=-1)


def write_model(path, names=NAMES) -> Path:
  """A covid3d export file of `_tiny_ensemble` with fixed weights, for the classes ``names``."""
  rng = np.random.default_rng(0)
  leaves = (rng.standard_normal((3, len(names))).astype(np.float32),
            rng.standard_normal(len(names)).astype(np.float32))
  path.write_bytes(export.pack(_tiny_ensemble, leaves, SIZE, names, (0, 1), "tiny", CARD))
  return path


def write_scan(path, seed=0, shape=(32, 48, 48)) -> Path:
  """A phantom chest CT (int16 HU) written by SimpleITK at ``path`` (its suffix: the format)."""
  import SimpleITK as sitk
  hu, _, info = phantom.make_scan(seed, kind="covid", severity=2, shape=shape)
  image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
  image.SetSpacing(info["spacing"][::-1])
  sitk.WriteImage(image, str(path))
  return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return write_model(tmp_path_factory.mktemp("model") / "tiny.covid3d")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  """Two phantom scans (MetaImage, NIfTI) in a folder of their own."""
  folder = tmp_path_factory.mktemp("scans")
  return [write_scan(folder / "a.mha", 0), write_scan(folder / "b.nii.gz", 1)]


def read_rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def run(model, out, *scans, extra=()):
  return infer.main([f"--model={model}", f"--out={out}", *extra, *map(str, scans)])


def no_temporary_files(folder) -> bool:
  return not [p for p in Path(folder).iterdir() if p.name.startswith(".tmp-")]


def test_out_must_be_new_or_empty_and_a_second_run_needs_overwrite(model, scans, tmp_path,
                                                                   capsys):
  out = tmp_path / "out"
  assert run(model, out, *scans) == 0
  first = (out / "predictions.csv").read_bytes()
  assert not (out / "predictions.partial.csv").exists() and no_temporary_files(out)
  assert [r[0] for r in read_rows(out / "predictions.csv")] == ["scan", *map(str, scans)]
  capsys.readouterr()
  # The second run into the same OUT: refused in one line, nothing touched.
  assert run(model, out, scans[0]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--out {out} is not empty" in err and "--overwrite" in err
  assert (out / "predictions.csv").read_bytes() == first
  # With --overwrite, the table is the second run's.
  assert run(model, out, scans[0], extra=["--overwrite"]) == 0
  assert [r[0] for r in read_rows(out / "predictions.csv")] == ["scan", str(scans[0])]
  assert no_temporary_files(out)
  # An empty OUT is fine; a file is not.
  (tmp_path / "empty").mkdir()
  assert run(model, tmp_path / "empty", scans[0]) == 0
  capsys.readouterr()
  assert run(model, scans[0], scans[1], extra=["--overwrite"]) == 2
  assert capsys.readouterr().err == (f"python -m covid3d.infer: --out {scans[0]} is not a folder: "
                                     "give a new or empty folder\n")


def test_a_link_in_out_is_refused_and_what_it_points_to_is_untouched(model, scans, tmp_path,
                                                                     capsys):
  victim = tmp_path / "victim.txt"
  victim.write_text("a file outside OUT\n")
  out = tmp_path / "out"
  out.mkdir()
  for name in ("predictions.csv", "predictions.partial.csv"):
    (out / name).symlink_to(victim)
    assert run(model, out, *scans, extra=["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m covid3d.infer: {out / name} is a symbolic link: covid3d writes no "
                   "output through a link (remove it, or choose another output)\n")
    assert victim.read_text() == "a file outside OUT\n"
    (out / name).unlink()
  # A link made while the run goes on: the write refuses it; the link stays a link.
  link = tmp_path / "late.png"
  link.symlink_to(victim)
  with pytest.raises(storage.LinkRefused, match="late.png is a symbolic link"):
    with storage.output_path(link) as tmp:
      Path(tmp).write_bytes(b"png")
  assert link.is_symlink() and victim.read_text() == "a file outside OUT\n"
  assert no_temporary_files(tmp_path)


def test_each_output_is_written_whole_or_not_at_all(tmp_path):
  target = tmp_path / "x.nii.gz"
  target.write_bytes(b"before")
  with pytest.raises(RuntimeError):
    with storage.output_path(target) as tmp:
      assert tmp.endswith("-x.nii.gz") and os.path.dirname(tmp) == str(tmp_path)
      Path(tmp).write_bytes(b"half")
      raise RuntimeError("the writer failed")
  assert target.read_bytes() == b"before" and no_temporary_files(tmp_path)
  storage.write_bytes(target, b"after")
  assert target.read_bytes() == b"after" and no_temporary_files(tmp_path)
  assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _lung_segmenter():
  """A real `infer.Segmenter`: lung-density voxels of the cube (no trained model needed)."""
  return infer.Segmenter(lambda x: (np.asarray(x)[0, ..., 0] < 0.3).astype(np.float32), SIZE)


def _centre_cam(x, c):
  """A Grad-CAM stand-in with structure: distance from the cube's centre, (B, s, s, s)."""
  s = np.asarray(x).shape[1]
  grid = np.stack(np.meshgrid(*[np.arange(s)] * 3, indexing="ij"))
  heat = 1.0 - np.linalg.norm(grid - (s - 1) / 2, axis=0) / s
  return np.repeat(heat[None], len(c), axis=0)


def test_an_input_named_like_an_output_is_read_not_overwritten(model, scans, tmp_path):
  """``a.mha`` and ``a_saliency.nii.gz`` in OUT: a's outputs are renamed ``a_2``."""
  out = tmp_path / "out"
  out.mkdir()
  a = out / "a.mha"
  shutil.copy(scans[0], a)
  named_like_an_output = out / "a_saliency.nii.gz"
  named_like_an_output.write_bytes(gzip.compress(PUBLIC_NIFTI.read_bytes()))
  before = named_like_an_output.read_bytes()
  predictor = export.load(model)
  rows = infer.predict_scans(predictor, [a, named_like_an_output], out, _lung_segmenter(),
                             _centre_cam)
  assert named_like_an_output.read_bytes() == before
  made = {p.name for p in out.iterdir()} - {"a.mha", "a_saliency.nii.gz"}
  outputs = ("{}.png", "{}_lesions.nii.gz", "{}_saliency.nii.gz")
  assert made == {o.format(n) for o in outputs
                  for n in ("a_2", *(() if rows[1].error else ("a_saliency",)))}
  assert not rows[0].error and nibabel.load(out / "a_2_saliency.nii.gz").shape == (48, 48, 32)
  # The input was predicted as itself: as the same file elsewhere.
  elsewhere = tmp_path / "copy_saliency.nii.gz"
  shutil.copy(named_like_an_output, elsewhere)
  again = infer.predict_scans(predictor, [elsewhere], tmp_path / "out2")
  assert again[0].error == rows[1].error
  if not rows[1].error:
    np.testing.assert_allclose(again[0].probs, rows[1].probs, atol=1e-6)


def test_out_inside_an_input_or_an_input_as_the_table_is_refused(model, scans, tmp_path, capsys):
  folder = tmp_path / "dicom"
  folder.mkdir()
  (folder / "1.dcm").write_bytes(b"x")
  assert run(model, folder / "out", folder) == 2
  assert f"--out {folder / 'out'} is inside the input folder {folder}" in capsys.readouterr().err
  out = tmp_path / "out"
  out.mkdir()
  table = out / "predictions.csv"
  shutil.copy(scans[0], table)
  assert run(model, out, table, extra=["--overwrite"]) == 2
  assert f"the input {table} is where the table goes" in capsys.readouterr().err
  assert table.read_bytes() == scans[0].read_bytes()


def test_cells_a_spreadsheet_would_run_get_a_quote(tmp_path, scans, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  hostile = ["=HYPERLINK(1).mha", "+1.mha", "@SUM(1).mha", "-1.mha"]
  for name in hostile:
    shutil.copy(scans[0], tmp_path / name)
  (tmp_path / "=bad.nii.gz").write_bytes(b"not an image")
  model = write_model(tmp_path / "m.covid3d", names=("=cmd|' /C calc'!A0", "b"))
  assert infer.main([f"--model={model}", "--out=out", "--", *hostile, "=bad.nii.gz"]) == 1
  rows = read_rows(tmp_path / "out" / "predictions.csv")
  assert rows[0] == ["scan", "'=cmd|' /C calc'!A0", "b", "prediction", "fold_disagreement",
                     "warning", "error"]
  assert [r[0] for r in rows[1:]] == [f"'{n}" for n in [*hostile, "=bad.nii.gz"]]
  assert all(r[3] in ("'=cmd|' /C calc'!A0", "b") for r in rows[1:5]) and rows[5][6]
  assert infer.safe_cell("0.25") == "0.25" and infer.safe_cell("a=b") == "a=b"
  assert infer.safe_cell("\t=1") == "'\t=1"


def test_scan_paths_are_checked_before_the_models_load(scans, tmp_path, capsys):
  """A bad model and bad scans: the scans' lines come, one per path; OUT is not made."""
  (tmp_path / "empty").mkdir()
  os.mkfifo(tmp_path / "fifo.mha")
  bad = {tmp_path / "missing.mha": "no such file or folder",
         tmp_path / "empty": "empty folder",
         tmp_path / "fifo.mha": "neither a file nor a folder"}
  out = tmp_path / "out"
  rc = run(tmp_path / "no_model", out, scans[0], *bad)
  assert rc == 2 and not out.exists()
  assert capsys.readouterr().err.splitlines() == [
      f"python -m covid3d.infer: scan {p}: {why}" for p, why in bad.items()]
  if os.geteuid() != 0:   # root reads anything
    locked = tmp_path / "locked.mha"
    shutil.copy(scans[0], locked)
    locked.chmod(0)
    assert run(tmp_path / "no_model", out, locked) == 2
    assert capsys.readouterr().err == f"python -m covid3d.infer: scan {locked}: permission denied\n"
  assert run(tmp_path / "no_model", out, scans[0]) == 2   # the model's own line, after
  assert "no_model" in capsys.readouterr().err


def test_output_names_drop_the_input_format():
  taken = set()
  assert [infer.output_name(p, taken) for p in ("d/IM0001.dcm", "d/x.DCM", "s.nii.gz",
                                                "s.mha", "dicom_folder")] == [
      "IM0001", "x", "s", "s_2", "dicom_folder"]


def test_the_coronal_view_is_drawn_to_scale(tmp_path):
  assert infer.view_aspects((5.0, 0.7, 0.7)) == (1.0, pytest.approx(5.0 / 0.7))
  assert infer.view_aspects((1.0, 1.0, 1.0)) == (1.0, 1.0)
  volume = np.random.default_rng(0).random((10, 64, 64)).astype(np.float32)
  infer.plot_views(volume, tmp_path / "v.png", "v", spacing=(5.0, 0.7, 0.7))
  assert (tmp_path / "v.png").stat().st_size > 1000 and no_temporary_files(tmp_path)


def test_export_refuses_an_existing_out_a_link_a_folder_and_the_model_workdir(tmp_path, capsys):
  existing = tmp_path / "severity.covid3d"
  existing.write_bytes(b"the user's file")
  model_dir = tmp_path / "no_model"   # the --out checks come before the model is read
  assert export.main([f"--model={model_dir}", f"--out={existing}"]) == 2
  assert capsys.readouterr().err == (f"python -m covid3d.export: --out {existing} exists: give a "
                                     "new file, or --overwrite to replace it\n")
  link = tmp_path / "link.covid3d"
  link.symlink_to(existing)
  assert export.main([f"--model={model_dir}", f"--out={link}", "--overwrite"]) == 2
  assert f"--out {link} is a symbolic link" in capsys.readouterr().err
  assert export.main([f"--model={model_dir}", f"--out={tmp_path}", "--overwrite"]) == 2
  assert "is a folder" in capsys.readouterr().err
  model_dir.mkdir()
  assert export.main([f"--model={model_dir}", f"--out={model_dir / 'x.covid3d'}"]) == 2
  assert "which export only reads" in capsys.readouterr().err
  assert existing.read_bytes() == b"the user's file"
  # --overwrite gets past the --out checks to the model's own error.
  assert export.main([f"--model={tmp_path / 'nothing'}", f"--out={existing}", "--overwrite"]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_a_killed_run_leaves_a_partial_table_not_a_finished_looking_one(model, scans, tmp_path):
  """A second real process, killed between scans: the first run's predictions.csv is gone
  (--overwrite), and the partial table holds the scans done so far."""
  out = tmp_path / "out"
  assert run(model, out, *scans) == 0
  big = tmp_path / "big.mha"
  volume = np.zeros((192, 384, 384), np.int16) - 1000
  volume[20:-20, 60:-60, 60:-60] = 40
  import SimpleITK as sitk
  sitk.WriteImage(sitk.GetImageFromArray(volume), str(big))
  cmd = [sys.executable, "-m", "covid3d.infer", f"--model={model}", f"--out={out}",
         "--overwrite", str(scans[0]), *[str(big)] * 4]
  proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  partial = out / "predictions.partial.csv"
  deadline = time.monotonic() + 120
  while proc.poll() is None and time.monotonic() < deadline:
    if partial.exists() and len(read_rows(partial)) == 2:
      break
    time.sleep(0.02)
  running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert running, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
  assert not (out / "predictions.csv").exists()
  rows = read_rows(partial)
  assert rows[0][0] == "scan" and len(rows) >= 2 and rows[1][0] == str(scans[0])
