"""Stages ``severity`` and ``detection``: fine-tuning with k-fold cross-validation.

One model per fold, each trained on the other folds of the COV19-CT-DB
training partition and evaluated (EMA weights) on its own fold; a fold whose
``fold<k>/DONE`` exists is skipped on rerun. With ``data.folds = 1`` (the
authors' runs "without cross validation") one model ``fold0`` trains on every
labelled training scan and is selected on the labelled validation partition.
Then the fold ensemble predicts the validation and test partitions
(``covid3d.stages.predict``). The target (record label and class names) is
``covid3d.inference.workdir.target(config.stage)``.

Writes ``folds.csv``, ``fold<k>/`` (checkpoints, metrics), ``cv.json``
(per-fold and mean macro F1 and per-class F1 of each fold's best EMA
evaluation), the prediction outputs, and ``MODEL_CARD.md`` (``covid3d.model_card``:
training data, intended use, inputs, the CV figures).
"""
import json
import logging

import jax
import numpy as np
from etils import epath

from covid3d import losses, model_card, storage
from covid3d.data import folds as folds_lib
from covid3d.data import pipeline
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.inference.workdir import target
from covid3d.stages import fit, handoff, inputs, predict
from covid3d.train import tasks


def fold_table(config, workdir, source, label):
  """scan_id -> fold for the labelled training scans (``folds.csv``, reused)."""
  labelled = pipeline.select_records(source, label=label)
  ids = [source.index[i]["scan_id"] for i in labelled]
  labels = [source.index[i][label] for i in labelled]
  assignment = folds_lib.load_or_make_folds(workdir, ids, labels, config.data.folds,
                                            config.data.fold_seed, folds_csv=config.data.folds_csv)
  return dict(zip(ids, (int(f) for f in assignment), strict=True))


def train_fold(config, workdir, source, fold_of, fold, label, num_classes, val_source=None):
  """Trains fold ``fold``; ``val_source`` (no cross-validation): all of ``source`` trains."""
  if val_source is None:
    others = [f for f in range(config.data.folds) if f != fold]
    train_idx = pipeline.select_records(source, label=label, fold_of=fold_of, folds=others)
    val_idx = pipeline.select_records(source, label=label, fold_of=fold_of, folds=[fold])
  else:
    train_idx = pipeline.select_records(source, label=label)
    val_idx = pipeline.select_records(val_source, label=label)
  counts = np.bincount([source.index[i][label] for i in train_idx], minlength=num_classes)
  if config.loss.balanced and np.any(counts == 0):
    raise ValueError(f"fold {fold}: class counts {counts.tolist()} of its training folds include "
                     "zero; balanced CE needs every class (use fewer folds or more data)")
  model = build.make_model(config, {label: num_classes}, segmentation=False)
  fields = inputs.batch_fields(config, label=label)
  if config.loss.balanced:
    # The fold's class weights travel with the batches, so all folds share one program.
    task = tasks.classification_task(num_classes, label_key="label", weights_key="class_weights")
    wrapper = lambda it: fit.WithRow(it, "class_weights", losses.class_weights(counts))
  else:
    task, wrapper = tasks.classification_task(num_classes, label_key="label"), None
  fit.fit(config, workdir, model, source, train_idx, val_idx, fields, task, output=label,
          train_iter_wrapper=wrapper, val_source=val_source)
  best = handoff.best_evaluation(workdir)
  summary = {"fold": fold, "train_counts": counts.tolist(), "n_val": len(val_idx), **best}
  handoff.mark_done(workdir, summary)
  return summary


def run(config, workdir):
  predicted = target(config.stage)
  label, names = predicted.label, predicted.class_names
  skips = SkipLog()
  source = inputs.record_source(config, workdir, "cov19ctdb", ("train",), skips=skips)
  if config.data.folds == 1:
    fold_of = None
    val_source = inputs.record_source(config, workdir, "cov19ctdb", ("validation",), skips=skips)
  else:
    fold_of, val_source = fold_table(config, workdir, source, label), None
  summaries = []
  for fold in range(config.data.folds):
    fold_dir = epath.Path(workdir) / f"fold{fold}"
    if (fold_dir / handoff.DONE).exists():
      logging.info("fold %d already finished (%s): skipped", fold, fold_dir / handoff.DONE)
      summaries.append(json.loads((fold_dir / handoff.DONE).read_text()))
      continue
    logging.info("fold %d (folds 0..%d)", fold, config.data.folds - 1)
    summaries.append(train_fold(config, str(fold_dir), source, fold_of, fold, label, len(names),
                                val_source))
  cv = {"target": config.stage, "init_from": config.init_from, "folds": summaries,
        "selected_on": "validation" if val_source is not None else "held-out fold",
        "mean_macro_f1": float(np.mean([s["macro_f1"] for s in summaries])),
        "mean_f1_per_class": {name: float(np.mean([s[f"f1_{k}"] for s in summaries]))
                              for k, name in enumerate(names)}}
  storage.write_json(epath.Path(workdir) / "cv.json", cv, indent=1)
  logging.info("CV macro F1 %.4f over %d folds", cv["mean_macro_f1"], len(summaries))
  outputs = predict.predict_finetuned(config, workdir, skips=skips)
  if jax.process_index() == 0:
    model_card.write(workdir, json.loads(config.to_json_best_effort()), cv)
  handoff.mark_done(workdir, {"cv_macro_f1": cv["mean_macro_f1"], **outputs})
  return cv
