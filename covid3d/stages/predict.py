"""Stage ``predict``: the fold ensemble of a fine-tuning workdir on the COV19-CT-DB partitions.

Ensemble = mean of the fold models' softmax (the paper's intent; the
challenge code used only fold 5: ``--config.predict.folds=4``). Writes, per
partition, ``predictions_<partition>.csv`` (scan, one probability per class,
class), the challenge's submission format ``submission_<partition>/<class>.csv``
(a header line ``patient``, then the scan names predicted as that class, one
per line, as in the authors' submitted files), and where labels
exist ``metrics_<partition>.json`` and ``confusion_<partition>.png``.
"""
import csv
import dataclasses
import io
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from covid3d import config as base_config
from covid3d import metrics, storage
from covid3d.data.skips import SkipLog
from covid3d.stages import build, handoff, initial_params, inputs


def fold_dirs(finetune_dir, folds):
  dirs = [epath.Path(finetune_dir) / f"fold{f}" for f in folds]
  missing = [str(d) for d in dirs if not (d / handoff.DONE).exists()]
  if missing:
    raise handoff.HandOffError(
        f"unfinished folds {missing}: run the fine-tuning stage first "
        f"(python -m covid3d.main --config=configs/severity.py --workdir={finetune_dir})")
  return dirs


def predict_probs(config, model, params_list, source, output):
  """``(scan_ids, (N, K) mean softmax)`` of the models in ``params_list`` over ``source``."""
  apply_fn = build.apply_fn(model, config, output)
  forward = jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x, True, None), axis=-1))
  indices = np.arange(len(source.index))
  fields = inputs.batch_fields(config, image_only=True)
  ids, probs = [], []
  for batch in inputs.host_batches(source, indices, config.train.eval_batch_size, fields, config,
                                   every_record=True):
    p = np.mean([np.asarray(forward(params, jnp.asarray(batch["image"])))
                 for params in params_list], axis=0)
    keep = np.asarray(batch["valid"])
    probs.append(p[keep])
    ids += [source.index[i]["scan_id"] for i in np.asarray(batch["record_index"])[keep]]
  return ids, np.concatenate(probs)


def write_outputs(outdir, partition, ids, probs, names, labels=None):
  """CSV, submission files and (with labels) metrics + confusion plot; returns the metrics."""
  outdir = storage.as_path(outdir)
  pred = np.argmax(probs, axis=1)
  table = io.StringIO(newline="")
  w = csv.writer(table)
  w.writerow(["scan"] + [f"p_{n}" for n in names] + ["class"])
  for sid, p, c in zip(ids, probs, pred, strict=True):
    w.writerow([sid] + [f"{x:.6f}" for x in p] + [names[c]])
  storage.write_text(outdir / f"predictions_{partition}.csv", table.getvalue())
  sub = outdir / f"submission_{partition}"
  for k, name in enumerate(names):
    # The challenge lists scan folder names (ct_scan_N) under a 'patient' header.
    storage.write_text(sub / f"{name}.csv", "patient\n" + "".join(
        f"{sid.split('/')[-1]}\n" for sid, c in zip(ids, pred, strict=True) if c == k))
  if labels is None or not np.any(labels >= 0):
    return None
  known = labels >= 0
  cm = np.asarray(metrics.confusion_matrix(labels[known], pred[known], len(names)))
  result = {"partition": partition, "n": int(known.sum()), "macro_f1": float(metrics.macro_f1(cm)),
            "accuracy": float(metrics.accuracy(cm)),
            "f1_per_class": dict(zip(names, map(float, np.asarray(metrics.f1_per_class(cm))),
                                     strict=True)),
            "confusion_matrix": cm.tolist()}
  storage.write_json(outdir / f"metrics_{partition}.json", result, indent=1)
  metrics.plot_confusion_matrix(cm, list(names), str(outdir / f"confusion_{partition}.png"),
                                title=confusion_title(outdir, partition, result))
  return result


def confusion_title(outdir, partition: str, result: dict) -> str:
  """The confusion plot's title: the run (``outdir``'s name), the partition, accuracy and
  macro F1 of ``result`` (``metrics_<partition>.json``)."""
  return (f"{storage.as_path(outdir).name}, {partition} ({result['n']} scans)\n"
          f"accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}")


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """The fold models of a fine-tuning workdir: one ``model``, one params tree per fold."""
  model: Any
  params: list
  folds: tuple
  label: str              # the record label it predicts ('severity' or 'covid')
  names: tuple            # class names, in output order


def load_ensemble(config, finetune_dir) -> Ensemble:
  """The best EMA weights of ``finetune_dir``'s folds (``config.predict.folds``, else all).

  Raises:
    HandOffError: an unfinished fold, or weights that do not fit ``config``'s model.
  """
  stage = handoff.stage_info(finetune_dir).get("stage")
  predicted = handoff.target(stage)
  label, names = predicted.label, predicted.class_names
  folds = (tuple(int(f) for f in base_config.listed(config.predict.folds))
           or tuple(range(config.data.folds)))
  params_list = [initial_params.best_params(d) for d in fold_dirs(finetune_dir, folds)]
  model = build.make_model(config, {label: len(names)}, segmentation=False)
  like = build.init_params(model, config, min(config.data.sizes))
  for fold, params in zip(folds, params_list, strict=True):
    initial_params.check_fits(params, like, f"fold {fold} of {finetune_dir}",
                       f"was it fine-tuned ({stage}, {len(names)} classes) with "
                       f"model.variant={config.model.variant!r}?")
  return Ensemble(model, params_list, folds, label, tuple(names))


def predict_finetuned(config, finetune_dir, outdir=None, skips: SkipLog | None = None):
  """Ensemble predictions of ``finetune_dir``'s folds; returns the labelled partitions' macro F1.

  The target (severity or detection) is the stage ``finetune_dir`` ran.
  ``skips``: the stage's skip report, to which the partitions' scans are added.
  """
  skips = SkipLog() if skips is None else skips
  ensemble = load_ensemble(config, finetune_dir)
  model, params_list, label, names = ensemble.model, ensemble.params, ensemble.label, ensemble.names
  outdir = outdir or finetune_dir
  summary = {"ensemble_folds": list(ensemble.folds)}
  for partition in base_config.listed(config.predict.partitions):
    refs = inputs.list_refs(config, "cov19ctdb", (partition,), skips)
    if not refs:
      logging.info("partition %s has no scans: nothing to predict", partition)
      continue
    source = inputs.record_source(config, outdir, "cov19ctdb", (partition,), refs=refs,
                                  skips=skips)
    ids, probs = predict_probs(config, model, params_list, source, label)
    by_id = {e["scan_id"]: e[label] for e in source.index}
    result = write_outputs(outdir, partition, ids, probs, names,
                           np.array([by_id[i] for i in ids]))
    logging.info("predicted %d %s scans%s", len(ids), partition,
                 "" if result is None else f", macro F1 {result['macro_f1']:.4f}")
    if result is not None:
      summary[f"{partition}_macro_f1"] = result["macro_f1"]
  return summary


def run(config, workdir):
  if not epath.Path(config.init_from).is_dir():
    raise handoff.HandOffError(
        f"predict: init_from={config.init_from!r} must be the workdir of a severity or "
        "detection stage")
  summary = predict_finetuned(config, config.init_from, workdir)
  handoff.mark_done(workdir, summary)
  return summary
