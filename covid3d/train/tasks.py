"""Tasks: the loss and the evaluation sums/summary the loop needs for one kind of training.

A ``Task`` bundles the step contracts of ``covid3d.train.steps`` (``loss_fn``
returning ``(loss, weight)``, ``eval_fn`` returning sums) with ``summarize``,
which turns the sums over a whole validation set (all devices and hosts) into
metrics, and the name of the metric that picks the best checkpoint.
"""
import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from covid3d import losses, metrics


@dataclasses.dataclass(frozen=True)
class Task:
  """What to optimise and how to score it.

  Attributes:
    loss_fn: ``(outputs, batch) -> (loss, weight)`` (see ``steps``).
    eval_fn: ``(outputs, batch) -> dict of sums`` (see ``steps``).
    summarize: dict of summed numpy arrays -> dict of float metrics (higher is
      better; ``train.best_metric`` names the one that picks checkpoints).
    num_classes: int or None (chooses the default EMA decay).
  """
  loss_fn: Callable
  eval_fn: Callable
  summarize: Callable[[dict], dict]
  num_classes: int | None = None


def _valid(batch, n, key="valid"):
  return jnp.asarray(batch[key], bool) if key in batch else jnp.ones((n,), bool)


def classification_task(num_classes: int, class_counts=None, label_key: str = "label",
                        weights_key: str | None = None) -> Task:
  """Softmax classification; balanced cross entropy when ``class_counts`` is given.

  Args:
    num_classes: K (4 for severity, 2 for detection).
    class_counts: optional ``(K,)`` training-fold class counts: the paper's
      balanced cross entropy (``losses.class_weights``); None: plain CE.
    label_key: batch entry with the ``(B,)`` int labels (-1 = unknown).
    weights_key: instead of ``class_counts``, read the ``(K,)`` class weights
      from ``batch[weights_key][0]`` (every row the same). Data rather than a
      constant of the program, so runs that differ only in their class counts
      (the folds of a cross-validation) share one compiled step.

  Metrics (EMA model): 'macro_f1' (the usual ``train.best_metric``), 'accuracy',
  'loss' (unweighted mean cross entropy), 'f1_<k>' per class.
  """
  weights = None if class_counts is None else losses.class_weights(class_counts)

  def loss_fn(logits, batch):
    labels = jnp.asarray(batch[label_key], jnp.int32)
    counted = (labels >= 0) & _valid(batch, labels.shape[0])
    w = counted.astype(jnp.float32)
    class_w = weights if weights_key is None else jnp.asarray(batch[weights_key][0], jnp.float32)
    if class_w is not None:
      w = w * class_w[jnp.where(labels >= 0, labels, 0)]
    return losses.cross_entropy(logits, labels, class_w, counted), jnp.sum(w)

  def eval_fn(logits, batch):
    labels = jnp.asarray(batch[label_key], jnp.int32)
    counted = (labels >= 0) & _valid(batch, labels.shape[0])
    n = jnp.sum(counted.astype(jnp.float32))
    return {"confusion": metrics.confusion_matrix(labels, jnp.argmax(logits, -1),
                                                  num_classes, mask=counted),
            "loss_sum": losses.cross_entropy(logits, labels, None, counted) * n,
            "count": n}

  def summarize(sums):
    cm = np.asarray(sums["confusion"])
    out = {"macro_f1": float(metrics.macro_f1(cm)), "accuracy": float(metrics.accuracy(cm)),
           "loss": float(sums["loss_sum"] / max(float(sums["count"]), 1.0))}
    out.update({f"f1_{k}": float(f) for k, f in enumerate(np.asarray(metrics.f1_per_class(cm)))})
    return out

  return Task(loss_fn, eval_fn, summarize, num_classes)


def segmentation_task(mask_key: str = "mask") -> Task:
  """Binary lesion segmentation: soft Dice + BCE, scored by the Dice of the hard mask.

  The training Dice is per example (``per_example=True``) so the update does
  not depend on how the batch is split over devices; weight = the number of
  valid examples. The evaluation pools all voxels of the validation set:
  ``metrics.dice_terms`` of ``P = sigmoid(logit) > 0.5`` against the mask,
  summed over all batches, devices and hosts, then ``metrics.dice_from_terms``.

  Args:
    mask_key: batch entry with the ``(B, D, H, W)`` or ``(B, D, H, W, 1)`` mask.
  """
  def loss_fn(logits, batch):
    valid = _valid(batch, logits.shape[0])
    loss = losses.segmentation_loss(logits, jnp.asarray(batch[mask_key]).reshape(logits.shape),
                                    valid, per_example=True)
    return loss, jnp.sum(valid.astype(jnp.float32))

  def eval_fn(logits, batch):
    mask = jnp.asarray(batch[mask_key]).reshape(logits.shape)
    intersection, total = metrics.dice_terms(logits > 0, mask, _valid(batch, logits.shape[0]))
    return {"intersection": intersection, "total": total}

  def summarize(sums):
    return {"dice": float(metrics.dice_from_terms(sums["intersection"], sums["total"]))}

  return Task(loss_fn, eval_fn, summarize)
