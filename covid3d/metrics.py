"""Challenge metrics: confusion matrix, per-class and macro F1, accuracy, Dice.

Metrics over a validation set are built from sums (confusion counts, Dice
intersections and sizes, ``dice_terms``), so that per-batch results can be
added up over batches, devices and hosts (the eval step of
``covid3d.train.tasks`` does that) and turned into the final figure once at
the end. Everything except ``plot_confusion_matrix`` works under ``jax.jit``.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from covid3d import storage


def _check_classes(name, values, num_classes, lowest):
  """Range check of concrete integer labels; skipped for traced values."""
  if isinstance(values, jax.core.Tracer):
    return
  arr = np.asarray(values)
  if arr.size and (arr.min() < lowest or arr.max() >= num_classes):
    raise ValueError(f"{name} must lie in [{lowest}, {num_classes}); got values from "
                     f"{arr.min()} to {arr.max()}")


def confusion_matrix(labels, preds, num_classes: int, mask=None):
  """Counts of (true class, predicted class) pairs.

  Args:
    labels: ``(N,)`` int true classes in ``[0, K)``; -1 = unknown (not counted).
    preds: ``(N,)`` int predicted classes in ``[0, K)``.
    num_classes: K (static).
    mask: optional ``(N,)`` bool, False for padded examples (not counted).

  Returns:
    ``(K, K)`` int32 matrix, rows = true class, columns = predicted class.

  Raises:
    ValueError: for concrete labels/preds out of range.
  """
  _check_classes("labels", labels, num_classes, -1)
  _check_classes("preds", preds, num_classes, 0)
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  preds = jnp.asarray(preds, jnp.int32).reshape(-1)
  keep = labels >= 0
  if mask is not None:
    keep = keep & jnp.asarray(mask, bool).reshape(-1)
  index = jnp.where(keep, labels * num_classes + preds, 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(keep.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def _ratio(num, den, empty=0.0):
  """``num / den`` in float32, ``empty`` where ``den == 0``."""
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), empty)


def f1_per_class(cm):
  """Per-class F1 = 2 TP / (2 TP + FP + FN); 0 for a class never present nor predicted.

  Equals ``sklearn.metrics.f1_score(y, p, labels=range(K), average=None,
  zero_division=0)``.

  Args:
    cm: ``(K, K)`` confusion matrix (rows true, columns predicted).

  Returns:
    ``(K,)`` float32.
  """
  cm = jnp.asarray(cm)
  tp = jnp.diagonal(cm)
  return _ratio(2 * tp, jnp.sum(cm, axis=0) + jnp.sum(cm, axis=1))


def macro_f1(cm):
  """Unweighted mean of ``f1_per_class`` over all K classes (the challenge's score).

  Equals ``sklearn.metrics.f1_score(y, p, labels=range(K), average='macro',
  zero_division=0)``. Note that without ``labels=`` scikit-learn averages
  only over the classes present in ``y`` or ``p``; here an absent class
  counts as 0.

  Args:
    cm: ``(K, K)`` confusion matrix.

  Returns:
    Scalar float32.
  """
  return jnp.mean(f1_per_class(cm))


def accuracy(cm):
  """Fraction of correct predictions, ``trace(cm) / sum(cm)`` (0 for an empty matrix)."""
  cm = jnp.asarray(cm)
  return _ratio(jnp.trace(cm), jnp.sum(cm))


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve of binary ``labels`` (0/1) by ``scores``; scikit-learn's value.

  The Mann-Whitney form with tied scores counted half (average ranks), which
  is exactly ``sklearn.metrics.roc_auc_score``. NaN when one class is absent.
  """
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  ranks[order] = np.arange(1, len(scores) + 1)
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  ranks = (sums / counts)[inverse]                 # average rank of each tie group
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def dice_terms(pred_mask, true_mask, valid=None):
  """Sums behind the Dice score: ``(|A and B|, |A| + |B|)``.

  Args:
    pred_mask: ``(B, ...)`` predicted binary mask (bool or 0/1).
    true_mask: same shape, true binary mask; negative voxels (-1) = unknown,
      not counted.
    valid: optional ``(B,)`` bool, False for examples without a mask.

  Returns:
    Two float32 scalars (float32 counts are exact up to 2^24 voxels per call
    and accurate to ~1e-7 relative beyond).
  """
  pred_mask = jnp.asarray(pred_mask)
  true_mask = jnp.asarray(true_mask)
  if pred_mask.shape != true_mask.shape:
    raise ValueError(f"dice: pred_mask shape {pred_mask.shape} differs from true_mask shape "
                     f"{true_mask.shape}")
  w = true_mask >= 0
  if valid is not None:
    w = w & jnp.asarray(valid, bool).reshape((-1,) + (1,) * (w.ndim - 1))
  a = (pred_mask > 0) & w
  b = (true_mask > 0) & w
  inter = jnp.sum(a & b, dtype=jnp.float32)
  total = jnp.sum(a, dtype=jnp.float32) + jnp.sum(b, dtype=jnp.float32)
  return inter, total


def dice_from_terms(intersection, total):
  """``2 * intersection / total``; 1.0 when both masks are empty (total 0)."""
  return _ratio(2.0 * intersection, total, empty=1.0)


def dice(pred_mask, true_mask, valid=None):
  """Dice score ``2 |A and B| / (|A| + |B|)`` of binary masks, pooled over all voxels given.

  Two empty masks score 1.0 (perfect agreement).

  Args:
    pred_mask, true_mask, valid: see ``dice_terms``.

  Returns:
    Scalar float32 in [0, 1].
  """
  return dice_from_terms(*dice_terms(pred_mask, true_mask, valid))


def plot_confusion_matrix(cm, class_names: Sequence[str], path, title=None):
  """Writes a PNG of a confusion matrix with the count in every cell.

  Args:
    cm: ``(K, K)`` counts, rows true, columns predicted.
    class_names: K names for the axes.
    path: output PNG path (its folder is created).
    title: optional title; default shows accuracy and macro F1.

  Returns:
    The matplotlib ``Figure`` (already saved).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  cm = np.asarray(cm)
  k = len(class_names)
  if cm.shape != (k, k):
    raise ValueError(f"plot_confusion_matrix: cm shape {cm.shape} does not match "
                     f"{k} class_names")
  fig = Figure(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
  ax = fig.subplots()
  ax.imshow(cm, cmap="Blues", vmin=0)
  threshold = cm.max() / 2 if cm.size else 0
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
              color="white" if cm[i, j] > threshold else "black")
  ax.set_xticks(range(k), class_names, rotation=30, ha="right")
  ax.set_yticks(range(k), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title is None:
    title = f"accuracy {float(accuracy(cm)):.3f}, macro F1 {float(macro_f1(cm)):.3f}"
  ax.set_title(title)
  fig.tight_layout()
  storage.save_figure(fig, path)
  return fig
