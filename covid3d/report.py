"""``python -m covid3d.report ROOT``: the results table of the fine-tuning runs under ROOT.

Reads every ``ROOT/*/cv.json`` (finetune workdirs) and, where present,
``metrics_validation.json``; writes ``ROOT/report.md`` (and prints it) and
``ROOT/report.png``, a bar chart of the CV macro F1 per run with the folds as dots.
Nothing to report (no ``*/cv.json``) is one line on stderr and exit status 2,
and writes nothing.
A run made with a preset of the paper's rows (``configs/severity.py:NAME``) gets
the paper's CV macro F1 (``covid3d.stages.chain``'s presets) beside its own, and a
marker in the plot.
"""
import argparse
import numpy as np

from covid3d import storage
from covid3d.stages import chain

def collect(root) -> list[dict]:
  """One row per finetune workdir under ``root``, sorted by name."""
  rows = []
  for cv_path in sorted(storage.as_path(root).glob("*/cv.json")):
    cv = storage.read_json(cv_path)
    folds = [f["macro_f1"] for f in cv["folds"]]
    row = {"run": cv_path.parent.name, "target": cv["target"], "init_from": cv["init_from"],
           "folds": folds, "cv_macro_f1": float(np.mean(folds)), "cv_std": float(np.std(folds)),
           "f1_per_class": cv["mean_f1_per_class"]}
    config = cv_path.parent / "config.json"
    preset = storage.read_json(config).get("preset", "") if config.exists() else ""
    paper = paper_cv_macro_f1(cv["target"], preset)
    if paper is not None:
      row["paper_cv_macro_f1"] = paper
    val = cv_path.parent / "metrics_validation.json"
    if val.exists():
      row["validation_macro_f1"] = storage.read_json(val)["macro_f1"]
    rows.append(row)
  return rows


def paper_cv_macro_f1(target: str, preset: str) -> float | None:
  """The paper's CV macro F1 (%) of the row ``preset`` reproduces (``chain.Preset``), or None."""
  presets = {p.name: p for t in chain.FINETUNE_TARGETS if t.name == target for p in t.presets}
  return presets[preset].paper_cv_macro_f1 if preset in presets else None


def chance(row) -> float:
  """Expected macro F1 of a uniform random guess on balanced classes: 1 / classes."""
  return 1.0 / len(row["f1_per_class"])


def markdown(rows) -> str:
  """The report's text: the table of ``rows`` (`collect`), one table per target when the
  root holds runs of several (severity and detection have other classes), then chance."""
  if not rows:
    return "No finetune runs (no */cv.json) found.\n"
  targets = list(dict.fromkeys(r["target"] for r in rows))
  parts = []
  for name in targets:
    heading = [f"### {name}", ""] if len(targets) > 1 else []
    parts.append("\n".join(heading + table([r for r in rows if r["target"] == name])))
  levels = sorted({f"{100 * chance(r):.0f} %" for r in rows})
  return ("\n\n".join(parts) + "\n\nChance level (uniform random guess, balanced classes): "
          f"{', '.join(levels)}.\n")


def table(rows) -> list[str]:
  """The markdown lines of the table of ``rows``, runs of one target."""
  classes = list(rows[0]["f1_per_class"])
  paper = any("paper_cv_macro_f1" in r for r in rows)
  head = (["run", "init_from", "CV macro F1 (mean ± std)"] + [f"CV F1 {c}" for c in classes]
          + ["validation macro F1 (ensemble)"] + (["paper: CV macro F1"] if paper else []))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], r["init_from"].rstrip("/").rsplit("/", 1)[-1] or r["init_from"],
             f"{100 * r['cv_macro_f1']:.2f} ± {100 * r['cv_std']:.2f}"]
    cells += [f"{100 * r['f1_per_class'][c]:.2f}" for c in classes]
    cells.append(f"{100 * r['validation_macro_f1']:.2f}" if "validation_macro_f1" in r else "-")
    if paper:
      cells.append(f"{r['paper_cv_macro_f1']:.2f}" if "paper_cv_macro_f1" in r else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def figure(rows):
  """The bar chart of ``rows`` (`collect`) as a matplotlib Figure: the y axis runs to 105 %
  and the dots are not clipped, so a fold at 100 % shows whole."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(max(1.6 * len(rows) + 1, 6.0), 3.2))  # room for the title
  ax = fig.subplots()
  for i, r in enumerate(rows):
    ax.bar(i, 100 * r["cv_macro_f1"], color="tab:blue", alpha=0.6)
    ax.plot([i] * len(r["folds"]), 100 * np.asarray(r["folds"]), "k.", ms=5, clip_on=False)
    ax.plot([i - 0.45, i + 0.45], [100 * chance(r)] * 2, "r--", lw=1,
            label="chance (random guess)" if i == 0 else None)
    if "paper_cv_macro_f1" in r:
      first = not any("paper_cv_macro_f1" in q for q in rows[:i])
      ax.plot(i, r["paper_cv_macro_f1"], "D", color="tab:orange", ms=6, clip_on=False,
              label="the paper (real data)" if first else None)
  ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=20, ha="right")
  ax.set_ylabel("CV macro F1 (%)")
  ax.set_ylim(0, 105)
  ax.set_yticks(range(0, 101, 20))
  ax.set_title("cross-validation macro F1 per run (dots: folds)")
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  return fig


def plot(rows, path):
  """`figure` of ``rows`` written whole as PNG at ``path``."""
  storage.save_figure(figure(rows), path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m covid3d.report", allow_abbrev=False,
                                   description="The results table and plot of the fine-tuning runs "
                                   "under ROOT.")
  parser.add_argument("root", metavar="ROOT", help="the folder holding the fine-tuning workdirs")
  root = storage.as_path(parser.parse_args(argv).root)
  if not root.is_dir():
    parser.exit(2, f"{parser.prog}: {root}: no such folder\n")
  rows = collect(root)
  if not rows:
    parser.exit(2, f"{parser.prog}: {root}: nothing to report (no fine-tuning run: no "
                "*/cv.json)\n")
  text = markdown(rows)
  storage.write_text(root / "report.md", text)
  plot(rows, root / "report.png")
  print(text, end="")
  return rows


if __name__ == "__main__":
  main()
