"""A model that is not one gets one line and exit status 2, from ``python -m covid3d.infer``,
``export`` and ``authors``; export files are checked by their members' declared sizes before
they are read; the model card's line is printed; ITK's warnings name their scan.

The bad export files are made from a real one (``export.pack`` of a tiny ensemble) with one
thing wrong each: a member missing, a member of the wrong type, the zip cut short, a
member's declared size patched to 3 GiB in the zip's headers (what a zip bomb declares).
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from covid3d import export, model_card
from covid3d.data import phantom_writers, read_common, read_dicom
from tests.infer.test_outputs import CARD, write_model, write_scan

REPO = Path(__file__).resolve().parents[2]
GIB3 = 3 * 2**30


def run_cli(module, *args, env=None):
  """``python -m covid3d.<module> ARGS`` in a process of its own: (status, stdout, stderr)."""
  proc = subprocess.run([sys.executable, "-m", f"covid3d.{module}", *map(str, args)],
                        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                        text=True, timeout=600, check=False)
  return proc.returncode, proc.stdout, proc.stderr


def rewritten(good: Path, path: Path, members: dict) -> Path:
  """``good``'s zip with ``members`` (name -> bytes, or None: left out) replaced."""
  with zipfile.ZipFile(good) as z, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for name in z.namelist():
      data = members.get(name, z.read(name))
      if data is not None:
        out.writestr(name, data)
  return path


def declare_size(path: Path, name: str, size: int) -> Path:
  """Patches the uncompressed size of member ``name`` to ``size`` in both of the zip's
  headers (local and central directory), as a zip bomb declares its expansion."""
  data = bytearray(path.read_bytes())
  encoded = name.encode()
  # (signature, offsets of the uncompressed size, of the name's length, of the name)
  for signature, size_at, length_at, name_at in ((b"PK\x03\x04", 22, 26, 30),
                                                 (b"PK\x01\x02", 24, 28, 46)):
    start = 0
    while (start := data.find(signature, start)) >= 0:
      length = int.from_bytes(data[start + length_at:start + length_at + 2], "little")
      if data[start + name_at:start + name_at + length] == encoded:
        data[start + size_at:start + size_at + 4] = size.to_bytes(4, "little")
      start += 4
  path.write_bytes(bytes(data))
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_models")
  good = write_model(root / "good.covid3d")
  with zipfile.ZipFile(good) as z:
    meta = json.loads(z.read("meta.json"))
  bad = {
      "no params": rewritten(good, root / "no_params.covid3d", {"params.npz": None}),
      "classes a number": rewritten(good, root / "types.covid3d",
                                    {"meta.json": json.dumps({**meta, "classes": 4})}),
      "pickled params": rewritten(good, root / "pickle.covid3d",
                                  {"params.npz": _npz_with_an_object()}),
      "cut short": root / "short.covid3d",
      "meta.json of 3 GiB": declare_size(rewritten(good, root / "bomb_meta.covid3d", {}),
                                         "meta.json", GIB3),
      "params.npz of 3 GiB": declare_size(rewritten(good, root / "bomb_params.covid3d", {}),
                                          "params.npz", GIB3),
      "a config.json of no JSON": root / "workdir",
  }
  bad["cut short"].write_bytes(good.read_bytes()[:400])
  bad["a config.json of no JSON"].mkdir()
  (bad["a config.json of no JSON"] / "config.json").write_text("{not json")
  return {"good": good, "scan": write_scan(root / "a.mha"), "bad": bad, "root": root}


def _npz_with_an_object() -> bytes:
  import io

  import numpy as np
  buffer = io.BytesIO()
  np.savez(buffer, p00000=np.array([{"a": 1}], dtype=object), p00001=np.zeros(4, np.float32))
  return buffer.getvalue()


def assert_one_line(status, err, path):
  assert status == 2, err
  assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err


@pytest.mark.slow   # a process per file (about 5 s each on 2 idle cores)
@pytest.mark.parametrize("case", ["no params", "classes a number", "pickled params", "cut short",
                                  "meta.json of 3 GiB", "params.npz of 3 GiB",
                                  "a config.json of no JSON"])
def test_infer_says_what_is_wrong_with_the_model_in_one_line(files, tmp_path, case):
  bad = files["bad"][case]
  status, out, err = run_cli("infer", f"--model={bad}", f"--out={tmp_path / 'out'}",
                             files["scan"])
  assert_one_line(status, err, bad)
  assert out == "" and not (tmp_path / "out").exists()
  if "GiB" in case:
    assert "to 3221225472 bytes" in err or "declares 3221225472 bytes" in err


def test_declared_sizes_and_expansion_are_checked_before_reading(files, monkeypatch):
  with pytest.raises(ValueError, match="meta.json declares 3221225472 bytes, more than"):
    export.load(files["bad"]["meta.json of 3 GiB"])
  # Under the weights' limit, but millions of times its compressed size.
  with pytest.raises(ValueError, match="params.npz expands .* times .* a zip bomb"):
    export.load(files["bad"]["params.npz of 3 GiB"])
  # Weights above the limit, however they are compressed.
  monkeypatch.setitem(export.MAX_BYTES, "params.npz", 2**30)
  with pytest.raises(ValueError, match="params.npz declares 3221225472 bytes, more than"):
    export.load(files["bad"]["params.npz of 3 GiB"])
  assert export.load(files["good"]).card == CARD


@pytest.mark.slow   # gcsfs retries before it gives up (about 10 s)
def test_an_unreachable_bucket_is_one_line(files, tmp_path):
  status, _, err = run_cli("infer", "--model=gs://covid3d-absent/severity",
                           f"--out={tmp_path / 'out'}", files["scan"],
                           env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"})
  assert_one_line(status, err, "gs://covid3d-absent/severity")
  assert "cannot be read" in err


@pytest.mark.slow   # two processes
def test_export_and_authors_convert_say_bad_models_in_one_line(files, tmp_path):
  workdir = files["bad"]["a config.json of no JSON"]
  status, _, err = run_cli("export", f"--model={workdir}", f"--out={tmp_path / 'm.covid3d'}")
  assert_one_line(status, err, workdir)
  not_a_submission = tmp_path / "list.pt"
  torch = pytest.importorskip("torch")
  torch.save([1, 2], not_a_submission)
  for source in (tmp_path / "absent.pt", not_a_submission, files["scan"]):
    status, _, err = run_cli("authors", "convert", source, tmp_path / "converted")
    assert_one_line(status, err, source)
    assert not (tmp_path / "converted").exists()


@pytest.mark.slow   # a process
def test_infer_prints_the_model_card_line_and_no_library_chatter(files, tmp_path):
  """The card's line first; nothing on stderr (JAX's INFO line on the TPU library it did not
  find is a library's start-up chatter, absl having set logging up on import)."""
  status, out, err = run_cli("infer", f"--model={files['good']}", f"--out={tmp_path / 'out'}",
                             files["scan"])
  assert status == 0 and err == ""
  assert out.splitlines()[0] == f"model: {model_card.headline(CARD)}"


def test_a_phantom_model_says_it_is_not_for_real_scans():
  from covid3d import config as base_config
  demo = json.loads(base_config.load("severity:demo").to_json_best_effort())
  card = model_card.render(demo, {"folds": [{"fold": 0, "macro_f1": 0.5, "f1_0": 0.25,
                                             "f1_1": 0.5, "f1_2": 0.75, "f1_3": 0.5}],
                                  "mean_macro_f1": 0.5})
  assert "not for real scans" in model_card.headline(card)
  assert "synthetic phantom" in card and "not a medical device" in card
  assert "| 0 | 0.500 | 0.250 | 0.500 | 0.750 | 0.500 |" in card
  full = json.loads(base_config.load("severity").to_json_best_effort())
  line = model_card.headline(model_card.render(full))
  assert "COV19-CT-DB" in line and "not for real scans" not in line
  assert "224^3" in model_card.render(full)


def test_itk_warnings_name_their_scan_without_build_paths(tmp_path, files, capfd, caplog):
  import SimpleITK as sitk
  folder = tmp_path / "gap"
  phantom_writers.write_dicom_series(sitk.ReadImage(str(files["scan"])), folder)
  os.remove(sorted(folder.iterdir())[10])   # a missing slice: ITK warns of non-uniform spacing
  capfd.readouterr()
  reader = sitk.ImageSeriesReader()   # ITK's own series reader warns; covid3d's reads by position
  reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
  with read_common.library_messages(folder), read_dicom.kept_locale():
    reader.Execute()
  err = capfd.readouterr().err
  assert "WARNING: In" not in err and ".hxx" not in err
  [line] = [r.getMessage() for r in caplog.records if "ITK" in r.getMessage()]
  assert line.startswith(f"{folder}: ITK: ImageSeriesReader: Non uniform sampling")
