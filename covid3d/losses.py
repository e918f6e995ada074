"""Training losses: (balanced) cross entropy, lesion segmentation, multitask.

Conventions shared by every function here:

* Class labels are int32 ``(B,)``; ``-1`` means "no label for this example".
  Unlabelled examples are masked out of the mean, not counted as class 0.
* Every loss is a weighted mean ``sum(w * loss) / sum(w)`` over the examples
  (or voxels) that count; when nothing counts the loss is exactly ``0.0`` and its
  gradient is zero, never NaN.
* All functions are pure and work under ``jax.jit``/``jax.grad``. The
  reductions are over the arrays given, i.e. over one device's shard when
  called inside ``shard_map``; the train step averages across devices.
"""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

SEGMENTATION = "segmentation"
DICE_EPS = 1.0


def _safe_ratio(num, den):
  """``num / den``, and 0 (with zero gradient) where ``den == 0``."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def class_weights(class_counts):
  """The paper's class weights: normalised inverse class frequency times K.

  ``w_k = K * (1 / n_k) / sum_j (1 / n_j)``, so the weights sum to K and a
  balanced training set gets all ones. The severity training counts
  (85, 62, 85, 26) give ``[0.15, 0.21, 0.15, 0.49] * 4``.

  Args:
    class_counts: ``(K,)`` number of training examples per class (the training
      fold's counts). Every count must be positive.

  Returns:
    ``(K,)`` float32 weights.

  Raises:
    ValueError: for concrete (non-traced) counts that are not all positive.
  """
  counts = class_counts
  if not isinstance(counts, jax.core.Tracer):
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0 or np.any(arr <= 0):
      raise ValueError(f"class_counts must be a non-empty 1-D array of positive counts "
                       f"(a class with no training example has no weight); got {arr}")
  inv = 1.0 / jnp.asarray(counts, jnp.float32)
  return inv / jnp.sum(inv) * inv.shape[0]


def cross_entropy(logits, labels, weights=None, mask=None):
  """Mean softmax cross entropy over labelled examples, optionally class-weighted.

  With class weights this is PyTorch's ``CrossEntropyLoss(weight=w)``:
  ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over the counted examples.

  Args:
    logits: ``(B, K)`` float logits.
    labels: ``(B,)`` int class indices in ``[0, K)``; ``-1`` = unknown (ignored).
    weights: optional ``(K,)`` per-class weights.
    mask: optional ``(B,)`` bool/0-1, False for examples to ignore (padding).

  Returns:
    Scalar float32 loss; 0.0 when no example is counted.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  known = labels >= 0
  safe = jnp.where(known, labels, 0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
  w = known.astype(jnp.float32)
  if weights is not None:
    w = w * jnp.asarray(weights, jnp.float32)[safe]
  if mask is not None:
    w = w * jnp.asarray(mask, jnp.float32)
  return _safe_ratio(jnp.sum(w * nll), jnp.sum(w))


def balanced_cross_entropy(logits, labels, class_counts, mask=None):
  """The paper's balanced cross entropy: ``cross_entropy`` with ``class_weights``.

  Args:
    logits: ``(B, K)`` float logits.
    labels: ``(B,)`` int labels, ``-1`` = unknown.
    class_counts: ``(K,)`` training-fold class counts (see ``class_weights``).
    mask: optional ``(B,)`` bool, False for padded examples.

  Returns:
    Scalar float32 loss.
  """
  return cross_entropy(logits, labels, class_weights(class_counts), mask)


def segmentation_loss(logits, mask, valid=None, per_example=True):
  """Soft Dice + binary cross entropy on the lesion logit (the authors' loss).

  ``loss = (1 - dice) + bce`` with ``p = sigmoid(logits)``,
  ``dice = (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` (eps 1, as the
  authors' code) and ``bce`` the mean binary cross entropy over the counted
  voxels.

  Dice pooling: ``per_example=True`` (default) computes one Dice per example
  and averages over the examples with a counted voxel, as the authors' code
  does in both its segmentation and its multitask training; it does not
  depend on how the batch is split over devices. ``per_example=False`` pools
  the sums over all counted voxels of the batch at once (inside ``shard_map``
  that pools one device's shard only).

  Args:
    logits: ``(B, ...)`` float lesion logits, e.g. ``(B, D, H, W, 1)``.
    mask: same shape (or without the trailing 1), int/float in {0, 1};
      voxels with a negative value (-1) are unknown and ignored.
    valid: optional ``(B,)`` bool, False for examples without a mask.
    per_example: Dice per example (True) or pooled over the batch (False).

  Returns:
    Scalar float32 loss; 0.0 when no voxel is counted.
  """
  logits = jnp.asarray(logits, jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != logits.shape:
    if logits.shape[-1] == 1 and mask.shape == logits.shape[:-1]:
      mask = mask[..., None]
    else:
      raise ValueError(f"segmentation_loss: mask shape {mask.shape} does not match "
                       f"logits shape {logits.shape}")
  w = (mask >= 0).astype(jnp.float32)
  if valid is not None:
    w = w * jnp.asarray(valid, jnp.float32).reshape((-1,) + (1,) * (w.ndim - 1))
  t = jnp.clip(mask.astype(jnp.float32), 0.0, 1.0)
  p = jax.nn.sigmoid(logits)
  # Stable log(1 + exp(-|x|)) form of the binary cross entropy with logits.
  bce = jnp.maximum(logits, 0.0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  bce = _safe_ratio(jnp.sum(w * bce), jnp.sum(w))

  axes = tuple(range(1, logits.ndim)) if per_example else None
  inter = jnp.sum(w * p * t, axis=axes)
  total = jnp.sum(w * p, axis=axes) + jnp.sum(w * t, axis=axes)
  dice_loss = 1.0 - (2.0 * inter + DICE_EPS) / (total + DICE_EPS)
  if per_example:
    counted = jnp.any(w > 0, axis=axes).astype(jnp.float32)
    dice_loss = _safe_ratio(jnp.sum(counted * dice_loss), jnp.sum(counted))
  return dice_loss + bce


def head_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                class_weights_by_head: Optional[Mapping[str, jax.Array]] = None):
  """One loss per head of a ``MultitaskModel`` output.

  Args:
    outputs: head name -> logits; classification heads ``(B, K)``, the
      ``'segmentation'`` head ``(B, D, H, W, 1)``.
    batch: head name -> targets: ``(B,)`` int labels with -1 = unknown for a
      classification head; for ``'segmentation'`` an int mask ``(B, D, H, W)``
      (or with a trailing 1) where an example without a mask is filled with -1.
    class_weights_by_head: optional head name -> ``(K,)`` class weights (e.g.
      from ``class_weights(counts)``) for a weighted cross entropy.

  Returns:
    Dict head name -> scalar float32 loss (0.0 for a head without any
    labelled example in the batch).
  """
  missing = sorted(set(outputs) - set(batch))
  if missing:
    raise KeyError(f"head_losses: the batch has no targets for heads {missing} "
                   f"(batch keys: {sorted(batch)})")
  by_head = class_weights_by_head or {}
  unknown = sorted(set(by_head) - set(outputs))
  if unknown:
    raise KeyError(f"head_losses: class_weights_by_head names heads {unknown} that the "
                   f"outputs lack")
  losses = {}
  for name, logits in outputs.items():
    if name == SEGMENTATION:
      losses[name] = segmentation_loss(logits, batch[name])
    else:
      losses[name] = cross_entropy(logits, batch[name], by_head.get(name))
  return losses


def multitask_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                   weights: Mapping[str, float],
                   class_weights_by_head: Optional[Mapping[str, jax.Array]] = None):
  """Weighted sum of the per-head losses (``head_losses``).

  Examples without a label for a head are masked out of that head's mean; a
  head with no labelled example in the batch contributes exactly 0.

  Args:
    outputs: head name -> logits (see ``head_losses``).
    batch: head name -> targets, -1 = unknown (see ``head_losses``).
    weights: head name -> weight; must name every head in ``outputs`` (use 0
      to switch a head off). The authors weight severity and segmentation 1:1.
    class_weights_by_head: optional head name -> ``(K,)`` class weights.

  Returns:
    Scalar float32 loss.
  """
  if set(weights) != set(outputs):
    raise KeyError(f"multitask_loss: weights name heads {sorted(weights)} but the outputs "
                   f"have heads {sorted(outputs)}; give every head a weight (0 to ignore it)")
  losses = head_losses(outputs, batch, class_weights_by_head)
  return sum(jnp.float32(weights[name]) * loss for name, loss in losses.items())
