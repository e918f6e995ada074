"""Stage ``multitask``: STOIC severity (real labels) + segmentation (pseudo-labels).

One backbone, a classification head ``stoic_severe`` (probSevere) and the
segmentation head, losses weighted by ``config.loss.weights`` (1:1). As in the
authors' code, both terms count COVID-positive patients only, and the
student's checkpoint is the one with the best STOIC ROC AUC of P(severe)
(``train.best_metric='auc'``; 'dice' and 'macro_f1' are reported too).
``multitask.scans='positive'`` (theirs) splits and batches the COVID-positive
scans only. What it hands on: ``segmentation.hand_on`` (by default the
student fine-tuned on the lesion set, its STOIC head kept, as the authors').
"""
import jax
import jax.numpy as jnp

from covid3d import losses, metrics
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.stages import fit, handoff, inputs
from covid3d.stages.segmentation import hand_on
from covid3d.train import tasks

HEAD = "stoic_severe"


def _labels(batch):
  """(severity labels, -1 where not counted; COVID-positive and not padding)."""
  valid = (jnp.asarray(batch["valid"], bool) if "valid" in batch
           else jnp.ones_like(batch[HEAD], bool))
  positive = (batch["stoic_covid"] == 1) & valid
  return jnp.where(positive, batch[HEAD], -1).astype(jnp.int32), positive


def multitask_task(weights) -> tasks.Task:
  cls = tasks.classification_task(2, label_key="label")
  seg = tasks.segmentation_task("mask")

  def loss_fn(outputs, batch):
    labels, positive = _labels(batch)
    mask = jnp.where(positive.reshape((-1,) + (1,) * (batch["mask"].ndim - 1)),
                     batch["mask"].astype(jnp.int32), -1)
    targets = {HEAD: labels, "segmentation": mask}
    loss = losses.multitask_loss(outputs, targets, {HEAD: weights.classification,
                                                    "segmentation": weights.segmentation})
    return loss, jnp.sum(positive.astype(jnp.float32))

  def eval_fn(outputs, batch):
    labels, positive = _labels(batch)
    sums = {f"cls_{k}": v for k, v in cls.eval_fn(outputs[HEAD], dict(batch, label=labels)).items()}
    sums.update({f"seg_{k}": v for k, v in seg.eval_fn(outputs["segmentation"],
                                                       dict(batch, valid=positive)).items()})
    sums["examples"] = {"severe": labels, "p_severe": jax.nn.softmax(outputs[HEAD], -1)[:, 1]}
    return sums

  def summarize(sums):
    out = cls.summarize({k[4:]: v for k, v in sums.items() if k.startswith("cls_")})
    out.update(seg.summarize({k[4:]: v for k, v in sums.items() if k.startswith("seg_")}))
    scored = sums["examples"]["severe"] >= 0
    out["auc"] = metrics.roc_auc(sums["examples"]["severe"][scored],
                                 sums["examples"]["p_severe"][scored])
    return out

  return tasks.Task(loss_fn, eval_fn, summarize, 2)


def train_fields(config) -> dict:
  """Batch key -> record field of the training batches: volumes, STOIC labels, masks."""
  return dict(inputs.batch_fields(config, stoic_covid="stoic_covid", stoic_severe="stoic_severe"),
              **inputs.mask_fields(config))


def split(config, source):
  """(train, validation) record indices of STOIC: ``multitask.scans``, ``data.val_fraction`` out."""
  if config.multitask.scans == "positive":
    among = [i for i, e in enumerate(source.index) if int(e["stoic_covid"]) == 1]
  elif config.multitask.scans == "all":
    among = None
  else:
    raise ValueError(f"multitask.scans must be 'positive' or 'all', got {config.multitask.scans!r}")
  return inputs.stage_holdout(config, source.index, config.data.val_fraction, among)


def run(config, workdir):
  skips = SkipLog()
  source = inputs.record_source(config, workdir, "stoic", skips=skips)
  source = inputs.with_pseudo_labels(source, config.pseudo_labels, "stoic")
  model = build.make_model(config, {HEAD: 2}, segmentation=True)
  train_idx, val_idx = split(config, source)
  fields = train_fields(config)

  def train_student(student_dir):
    result = fit.fit(config, student_dir, model, source, train_idx, val_idx, fields,
                     multitask_task(config.loss.weights))
    handoff.mark_trained(student_dir, result)
    return result

  return hand_on(config, workdir, train_student, model, skips)
