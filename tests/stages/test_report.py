"""covid3d.report: the results table and plot of the fine-tuning runs under a root."""
import json

import numpy as np
import pytest

from covid3d import report


def _write_run(root, name, folds, classes=("mild", "moderate", "severe", "critical"),
               target="severity"):
  run = root / name
  run.mkdir()
  cv = {"target": target, "init_from": f"/x/{name}",
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


def test_report_of_an_empty_root_is_one_line_and_exit_status_2(tmp_path, capsys):
  (tmp_path / "segmentation").mkdir()   # a workdir, but no fine-tuning run
  with pytest.raises(SystemExit) as exit_:
    report.main([str(tmp_path)])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (f"python -m covid3d.report: {tmp_path}: nothing to report "
                                     "(no fine-tuning run: no */cv.json)\n")
  assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.png").exists()


def test_a_fold_at_100_percent_is_drawn_whole(tmp_path):
  _write_run(tmp_path, "severity_segmia", [1.0, 0.8])
  fig = report.figure(report.collect(tmp_path))
  ax = fig.axes[0]
  assert ax.get_ylim()[1] >= 105
  dots = [line for line in ax.lines if line.get_marker() == "."]
  assert dots and not any(line.get_clip_on() for line in dots)
  assert max(dots[0].get_ydata()) == 100


def test_a_confusion_plot_names_its_run_and_partition(tmp_path):
  from covid3d.stages import predict
  run = tmp_path / "severity_segmia"
  probs = np.eye(4)[[0, 1, 2, 3, 3]]
  result = predict.write_outputs(run, "validation", [f"s{i}" for i in range(5)], probs,
                                 ("mild", "moderate", "severe", "critical"),
                                 np.array([0, 1, 2, 3, 2]))
  title = predict.confusion_title(run, "validation", result)
  assert title.splitlines()[0] == "severity_segmia, validation (5 scans)"
  assert title.splitlines()[1] == f"accuracy 0.800, macro F1 {result['macro_f1']:.3f}"
  assert (run / "confusion_validation.png").stat().st_size > 1000


def test_a_preset_run_gets_the_papers_figure_beside_its_own(tmp_path):
  _write_run(tmp_path, "ablation_table2_2g", [0.6, 0.8])
  (tmp_path / "ablation_table2_2g" / "config.json").write_text(json.dumps({"preset": "table2_2g"}))
  _write_run(tmp_path, "severity_random", [0.2, 0.4])   # no preset: no paper figure
  rows = report.main([str(tmp_path)])
  assert rows[0]["paper_cv_macro_f1"] == 69.61 and "paper_cv_macro_f1" not in rows[1]
  lines = (tmp_path / "report.md").read_text().splitlines()
  assert lines[0].endswith("| paper: CV macro F1 |")
  assert lines[2].endswith("| 69.61 |") and lines[3].endswith("| - |")


def test_runs_of_two_targets_get_a_table_each_with_the_papers_figures(tmp_path):
  """An ablations root: detection runs (2 classes) beside severity ones (4)."""
  _write_run(tmp_path, "detection_authors1", [0.9, 0.8], ("non-covid", "covid"), "detection")
  (tmp_path / "detection_authors1" / "config.json").write_text(json.dumps({"preset": "authors1"}))
  _write_run(tmp_path, "severity_authors1", [0.6, 0.8])
  (tmp_path / "severity_authors1" / "config.json").write_text(json.dumps({"preset": "authors1"}))
  rows = report.main([str(tmp_path)])
  assert [r["paper_cv_macro_f1"] for r in rows] == [91.73, 65.67]
  text = (tmp_path / "report.md").read_text()
  detection, severity = text.split("### severity\n")
  assert detection.startswith("### detection\n") and "CV F1 covid |" in detection
  assert "| detection_authors1 | detection_authors1 | 85.00 ± 5.00 | 50.00 | 50.00 | - | 91.73 |" \
      in detection
  assert "CV F1 critical |" in severity and severity.rstrip().endswith(
      "balanced classes): 25 %, 50 %.")


def test_help_and_a_missing_root_are_one_line_each(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    report.main(["--help"])
  assert exit_.value.code == 0 and "ROOT" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_:
    report.main([str(tmp_path / "nothing")])
  assert exit_.value.code == 2
  missing = tmp_path / "nothing"
  assert capsys.readouterr().err == f"python -m covid3d.report: {missing}: no such folder\n"
