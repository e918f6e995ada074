"""Stage ``predict``: the fold ensemble of a fine-tuning workdir on the COV19-CT-DB partitions.

Ensemble = mean of the fold models' softmax (the paper's intent; the
challenge code used only fold 5: ``--config.predict.folds=4``). Writes, per
partition, ``predictions_<partition>.csv`` (scan, one probability per class,
class), the challenge's submission format ``submission_<partition>/<class>.csv``
(a header line ``patient``, then the scan names predicted as that class, one
per line, as in the authors' submitted files), and where labels
exist ``metrics_<partition>.json`` and ``confusion_<partition>.png``. The
ensemble is ``covid3d.inference.ensemble``'s, which ``infer`` and ``export``
load too. With several processes each predicts its share of the scans
(``shards``), and process 0 writes the outputs once the shares are gathered.
"""
import csv
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from covid3d import config as base_config
from covid3d import metrics, storage
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.inference.ensemble import load_ensemble
from covid3d.stages import handoff, inputs, shards


def predict_probs(config, model, params_list, source, output):
  """``(scan_ids, (N, K) float32 mean softmax)`` of the models in ``params_list`` over every
  record of ``source``, in record order, on every process.

  Each process predicts its share of the records (``shards``); the shares are gathered.
  """
  apply_fn = build.apply_fn(model, config, output)
  forward = jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x, True, None), axis=-1))
  fields = inputs.batch_fields(config, image_only=True)
  index, probs = [np.zeros(0, np.int64)], []
  for batch in shards.batches(source, fields, config)[0]:
    p = np.mean([np.asarray(forward(params, jnp.asarray(batch["image"])))
                 for params in params_list], axis=0)
    keep = np.asarray(batch["valid"])
    probs.append(p[keep])
    index.append(np.asarray(batch["record_index"])[keep])
  empty = np.zeros((0, model.heads[output]), np.float32)   # a process with no share
  index, probs = shards.gather(np.concatenate(index), np.concatenate([empty, *probs]),
                               len(source.index), config.train.eval_batch_size)
  return [source.index[i]["scan_id"] for i in index], probs


def write_outputs(outdir, partition, ids, probs, names, labels=None):
  """CSV, submission files and (with labels) metrics + confusion plot; returns the metrics
  (`outcome`)."""
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
  result = outcome(partition, probs, names, labels)
  if result is not None:
    storage.write_json(outdir / f"metrics_{partition}.json", result, indent=1)
    metrics.plot_confusion_matrix(np.array(result["confusion_matrix"]), list(names),
                                  str(outdir / f"confusion_{partition}.png"),
                                  title=confusion_title(outdir, partition, result))
  return result


def outcome(partition, probs, names, labels=None) -> dict | None:
  """``metrics_<partition>.json`` of ``probs`` (N, K) against ``labels`` (N,) (-1: unknown);
  None without a known label."""
  if labels is None or not np.any(labels >= 0):
    return None
  known = labels >= 0
  cm = np.asarray(metrics.confusion_matrix(labels[known], np.argmax(probs, axis=1)[known],
                                           len(names)))
  return {"partition": partition, "n": int(known.sum()), "macro_f1": float(metrics.macro_f1(cm)),
          "accuracy": float(metrics.accuracy(cm)),
          "f1_per_class": dict(zip(names, map(float, np.asarray(metrics.f1_per_class(cm))),
                                   strict=True)),
          "confusion_matrix": cm.tolist()}


def confusion_title(outdir, partition: str, result: dict) -> str:
  """The confusion plot's title: the run (``outdir``'s name), the partition, accuracy and
  macro F1 of ``result`` (``metrics_<partition>.json``)."""
  return (f"{storage.as_path(outdir).name}, {partition} ({result['n']} scans)\n"
          f"accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}")


def predict_finetuned(config, finetune_dir, outdir=None, skips: SkipLog | None = None):
  """Ensemble predictions of ``finetune_dir``'s folds; returns the labelled partitions' macro F1.

  The target (severity or detection) is the stage ``finetune_dir`` ran.
  ``skips``: the stage's skip report, to which the partitions' scans are added.
  With several processes each predicts its share of the scans (``shards``),
  process 0 writes the outputs, and all return once they are written.
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
    labels = np.array([by_id[i] for i in ids])
    if jax.process_index() == 0:   # every process holds every scan's probabilities
      result = write_outputs(outdir, partition, ids, probs, names, labels)
    else:
      result = outcome(partition, probs, names, labels)
    logging.info("predicted %d %s scans%s", len(ids), partition,
                 "" if result is None else f", macro F1 {result['macro_f1']:.4f}")
    if result is not None:
      summary[f"{partition}_macro_f1"] = result["macro_f1"]
  if jax.process_count() > 1:   # DONE only once process 0 has written every output
    multihost_utils.sync_global_devices("covid3d predictions written")
  return summary


def run(config, workdir):
  if not epath.Path(config.init_from).is_dir():
    raise handoff.HandOffError(
        f"predict: init_from={config.init_from!r} must be the workdir of a severity or "
        "detection stage")
  summary = predict_finetuned(config, config.init_from, workdir)
  handoff.mark_done(workdir, summary)
  return summary
