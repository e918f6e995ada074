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


def test_a_preset_run_gets_the_papers_figure_beside_its_own(tmp_path):
  _write_run(tmp_path, "ablation_table2_2g", [0.6, 0.8])
  (tmp_path / "ablation_table2_2g" / "config.json").write_text(json.dumps({"preset": "table2_2g"}))
  _write_run(tmp_path, "severity_random", [0.2, 0.4])   # no preset: no paper figure
  rows = report.main([str(tmp_path)])
  assert rows[0]["paper_cv_macro_f1"] == 69.61 and "paper_cv_macro_f1" not in rows[1]
  lines = (tmp_path / "report.md").read_text().splitlines()
  assert lines[0].endswith("| paper: CV macro F1 |")
  assert lines[2].endswith("| 69.61 |") and lines[3].endswith("| - |")


def test_help_and_a_missing_root_are_one_line_each(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    report.main(["--help"])
  assert exit_.value.code == 0 and "ROOT" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_:
    report.main([str(tmp_path / "nothing")])
  assert exit_.value.code == 2
  missing = tmp_path / "nothing"
  assert capsys.readouterr().err == f"python -m covid3d.report: {missing}: no such folder\n"
