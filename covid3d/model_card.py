"""``MODEL_CARD.md``: what a fold ensemble was trained on, what it is for, what it reads.

Every fine-tuning workdir (``covid3d.stages.finetune``, ``python -m covid3d.authors
convert``) and every export (a member of the zip, ``covid3d.export``) carries
one. Its line ``In one line: ...`` is what ``python -m covid3d.infer`` prints
when it loads the model; for a model trained on the synthetic phantom that line
says it is not for real scans.
"""
import json

from etils import epath

from covid3d import storage
from covid3d.data.read_common import HU_WINDOW
from covid3d.inference import workdir

FILE = "MODEL_CARD.md"
HEADLINE = "In one line: "
AUTHORS_RECORD = "authors.json"   # what `python -m covid3d.authors convert` leaves (its RECORD)


def render(config: dict, cv: dict | None = None, converted: dict | None = None) -> str:
  """The card of the ensemble a fine-tuning stage with ``config`` (its ``config.json``) trains.

  Args:
    config: the stage's saved config (a dict).
    cv: its ``cv.json`` (per-fold and mean F1 of the held-out folds), if any.
    converted: the record of ``python -m covid3d.authors convert`` for the authors'
      converted submission files (then ``cv`` is theirs, unknown here).
  """
  stage = config["stage"]
  target = workdir.target(stage)
  data, model = config["data"], config["model"]
  size = min(data["sizes"])
  folds = data["folds"]
  phantom = bool(data.get("phantom"))
  what = (f"covid3d {stage} model ({', '.join(target.class_names)}), an ensemble of "
          f"{folds} ConvNeXt-{model['variant']} fold model(s)")
  if phantom:
    trained = ("trained on covid3d's synthetic phantom: a demonstration of the method, "
               "not for real scans")
    data_text = (
        "The synthetic phantom that covid3d generates (`covid3d.data.phantom`, "
        f"`data.phantom=True`; {data.get('phantom_scans')} scans per dataset): drawn "
        "volumes with a body, lungs and lesions, not CT of any patient. A model trained on "
        "it has never seen a real scan; its outputs on real scans mean nothing.")
  elif converted:
    trained = "the authors' (Kienzle et al.) weights, converted: for research only"
    data_text = (
        f"Converted from `{converted.get('source')}`, a submission file of Kienzle et al. "
        "(ECCV 2022 workshops), by `python -m covid3d.authors convert`. Their training data "
        "(COV19-CT-DB, with their pretraining on STOIC and COVID-19-20 lesions) are what "
        "their paper and the file's training config say; covid3d did not check them.")
  else:
    trained = "trained on COV19-CT-DB: for research only, not a medical device"
    data_text = (
        f"The labelled training partition of COV19-CT-DB (`{data.get('cov19ctdb_dir')}`), "
        f"{stage} labels, in {folds} cross-validation folds; initial weights from "
        f"`{config.get('init_from')}`.")
  lines = [
      f"# Model card: covid3d {stage} ensemble", "",
      f"{HEADLINE}{what}, {trained}.", "",
      "## Training data", "", data_text, "",
      "## Intended use", "",
      "Research on COVID-19 classification from lung CT (a reimplementation of Kienzle et al., "
      "ECCV 2022 workshops). It is not a medical device: it was not validated for diagnosis, "
      "triage or any clinical decision, and its outputs must not be used to treat anyone.", "",
      "## Inputs", "",
      "One chest CT per prediction: a NIfTI, MetaImage or NRRD file, a folder holding a DICOM "
      "series, or a folder of `<integer>.jpg`/`.png` axial slices (COV19-CT-DB). Hounsfield "
      f"units are clipped to [{HU_WINDOW[0]:g}, {HU_WINDOW[1]:g}] and scaled to [0, 1] (slice "
      f"images: 0..255 to [0, 1]), then resampled to a {size}^3 cube. Output: the mean of the "
      f"folds' softmax over {', '.join(target.class_names)}.", "",
      "## Cross-validation", ""]
  lines += _cv_lines(cv, target.class_names, converted)
  return "\n".join(lines) + "\n"


def _cv_lines(cv, names, converted) -> list[str]:
  if not cv:
    return ["Not known here: " + ("the authors' own figures are in their paper."
                                  if converted else "this workdir holds no `cv.json`.")]
  where = cv.get("selected_on", "held-out fold")
  head = ["| fold | macro F1 | " + " | ".join(f"F1 {n}" for n in names) + " |",
          "| --- | --- |" + " --- |" * len(names)]
  rows = [f"| {f['fold']} | {f['macro_f1']:.3f} | "
          + " | ".join(f"{f[f'f1_{k}']:.3f}" for k in range(len(names))) + " |"
          for f in cv["folds"]]
  return [f"Each fold model's best evaluation on its {where} (EMA weights); mean macro F1 "
          f"{cv['mean_macro_f1']:.3f}.", "", *head, *rows]


def headline(card: str) -> str:
  """The card's ``In one line:`` sentence ('' if it has none)."""
  return next((line[len(HEADLINE):] for line in card.splitlines() if line.startswith(HEADLINE)),
              "")


def for_workdir(workdir) -> str:
  """The card of a fine-tuning workdir: its ``MODEL_CARD.md``, else made (not written) from
  its ``config.json``, ``cv.json`` and the ``authors.json`` of a converted submission."""
  workdir = epath.Path(workdir)
  if (workdir / FILE).exists():
    return (workdir / FILE).read_text()
  config = json.loads((workdir / "config.json").read_text())
  cv, converted = (json.loads((workdir / name).read_text()) if (workdir / name).exists()
                   else None for name in ("cv.json", AUTHORS_RECORD))
  return render(config, cv, converted)


def write(workdir, config: dict, cv: dict | None = None, converted: dict | None = None):
  """Writes ``<workdir>/MODEL_CARD.md`` (`render`), whole (``storage.whole_file``)."""
  with storage.whole_file(epath.Path(workdir) / FILE) as f:
    f.write(render(config, cv, converted).encode("utf-8"))
