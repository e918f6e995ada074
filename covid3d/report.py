"""``python -m covid3d.report ROOT``: the results table of the fine-tuning runs under ROOT.

Reads every ``ROOT/*/cv.json`` (finetune workdirs) and, where present,
``metrics_validation.json``; writes ``ROOT/report.md`` (and prints it) and
``ROOT/report.png``, a bar chart of the CV macro F1 per run with the folds as dots.
"""
import json
import sys
from pathlib import Path

import numpy as np


def collect(root) -> list[dict]:
  """One row per finetune workdir under ``root``, sorted by name."""
  rows = []
  for cv_path in sorted(Path(root).glob("*/cv.json")):
    cv = json.loads(cv_path.read_text())
    folds = [f["macro_f1"] for f in cv["folds"]]
    row = {"run": cv_path.parent.name, "target": cv["target"], "init_from": cv["init_from"],
           "folds": folds, "cv_macro_f1": float(np.mean(folds)), "cv_std": float(np.std(folds)),
           "f1_per_class": cv["mean_f1_per_class"]}
    val = cv_path.parent / "metrics_validation.json"
    if val.exists():
      row["validation_macro_f1"] = json.loads(val.read_text())["macro_f1"]
    rows.append(row)
  return rows


def chance(row) -> float:
  """Expected macro F1 of a uniform random guess on balanced classes: 1 / classes."""
  return 1.0 / len(row["f1_per_class"])


def markdown(rows) -> str:
  if not rows:
    return "No finetune runs (no */cv.json) found.\n"
  classes = list(rows[0]["f1_per_class"])
  head = (["run", "init_from", "CV macro F1 (mean ± std)"] + [f"CV F1 {c}" for c in classes]
          + ["validation macro F1 (ensemble)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], Path(r["init_from"]).name or r["init_from"],
             f"{100 * r['cv_macro_f1']:.2f} ± {100 * r['cv_std']:.2f}"]
    cells += [f"{100 * r['f1_per_class'][c]:.2f}" for c in classes]
    cells.append(f"{100 * r['validation_macro_f1']:.2f}" if "validation_macro_f1" in r else "-")
    lines.append("| " + " | ".join(cells) + " |")
  levels = sorted({f"{100 * chance(r):.0f} %" for r in rows})
  lines.append(f"\nChance level (uniform random guess, balanced classes): {', '.join(levels)}.")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(1.6 * max(len(rows), 2) + 1, 3.2))
  for i, r in enumerate(rows):
    ax.bar(i, 100 * r["cv_macro_f1"], color="tab:blue", alpha=0.6)
    ax.plot([i] * len(r["folds"]), 100 * np.asarray(r["folds"]), "k.", ms=5)
    ax.plot([i - 0.45, i + 0.45], [100 * chance(r)] * 2, "r--", lw=1,
            label="chance (random guess)" if i == 0 else None)
  ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=20, ha="right")
  ax.set_ylabel("CV macro F1 (%)")
  ax.set_ylim(0, 100)
  ax.set_title("cross-validation macro F1 per run (dots: folds)")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: python -m covid3d.report ROOT")
  root = Path(argv[0])
  rows = collect(root)
  text = markdown(rows)
  (root / "report.md").write_text(text)
  if rows:
    plot(rows, root / "report.png")
  print(text, end="")
  return rows


if __name__ == "__main__":
  main()
