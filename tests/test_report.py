"""covid3d.report: the results table and plot of the fine-tuning runs under a root."""
import json

import pytest

from covid3d import report


def _write_run(root, name, folds, classes=("mild", "moderate", "severe", "critical")):
  run = root / name
  run.mkdir()
  cv = {"target": "severity", "init_from": f"/x/{name}",
        "folds": [{"fold": k, "macro_f1": f} for k, f in enumerate(folds)],
        "mean_f1_per_class": {c: 0.5 for c in classes}}
  (run / "cv.json").write_text(json.dumps(cv))


def test_report_tables_every_run_with_mean_and_chance(tmp_path, capsys):
  _write_run(tmp_path, "severity_random", [0.2, 0.4])
  _write_run(tmp_path, "severity_segmia", [0.6, 0.8])
  (tmp_path / "segmentation").mkdir()  # a pretraining workdir: no cv.json, not a row
  rows = report.main([str(tmp_path)])
  assert [r["run"] for r in rows] == ["severity_random", "severity_segmia"]
  assert rows[1]["cv_macro_f1"] == pytest.approx(0.7)
  text = (tmp_path / "report.md").read_text()
  assert "| severity_segmia | severity_segmia | 70.00 ± 10.00 |" in text
  assert "balanced classes): 25 %." in text
  assert text == capsys.readouterr().out
  assert (tmp_path / "report.png").stat().st_size > 0


def test_report_of_an_empty_root_says_so(tmp_path):
  assert report.main([str(tmp_path)]) == []
  assert "No finetune runs" in (tmp_path / "report.md").read_text()
  assert not (tmp_path / "report.png").exists()
