"""Metrics against scikit-learn and hand computations; sums over batches."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from covid3d import metrics


@functools.partial(jax.jit, static_argnums=2)
def all_metrics(labels, preds, k):
  cm = metrics.confusion_matrix(labels, preds, k)
  return cm, metrics.f1_per_class(cm), metrics.macro_f1(cm), metrics.accuracy(cm)


def test_confusion_matrix_and_f1_match_sklearn_on_many_random_cases():
  rng = np.random.default_rng(0)
  for case in range(240):
    k = 2 + case % 4
    # Draw from random subsets of the classes so that some classes are missing
    # from the labels, the predictions, or both.
    true_classes = rng.choice(k, rng.integers(1, k + 1), replace=False)
    pred_classes = rng.choice(k, rng.integers(1, k + 1), replace=False)
    y = rng.choice(true_classes, 16).astype(np.int32)
    p = rng.choice(pred_classes, 16).astype(np.int32)
    cm, f1, mf1, acc = all_metrics(y, p, k)
    labels = list(range(k))
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, p, labels=labels))
    np.testing.assert_allclose(
        f1, skm.f1_score(y, p, labels=labels, average=None, zero_division=0), atol=1e-6)
    np.testing.assert_allclose(
        mf1, skm.f1_score(y, p, labels=labels, average="macro", zero_division=0), atol=1e-6)
    np.testing.assert_allclose(acc, skm.accuracy_score(y, p), atol=1e-6)


def test_class_never_present_nor_predicted_scores_zero():
  y = np.array([0, 0, 1, 1])
  cm = metrics.confusion_matrix(y, y, 3)
  np.testing.assert_allclose(metrics.f1_per_class(cm), [1.0, 1.0, 0.0])
  np.testing.assert_allclose(metrics.macro_f1(cm), 2 / 3, rtol=1e-6)


def test_confusion_matrix_skips_unknown_labels_and_masked_examples():
  y = np.array([0, 1, -1, 2, 2, 1])
  p = np.array([0, 2, 1, 2, 0, 1])
  mask = np.array([True, True, True, True, False, True])
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)(y, p, 3, mask)
  keep = (y >= 0) & mask
  np.testing.assert_array_equal(cm, skm.confusion_matrix(y[keep], p[keep], labels=[0, 1, 2]))
  assert cm.dtype == jnp.int32


@pytest.mark.parametrize("labels, preds", [([0, 3], [0, 1]), ([0, -2], [0, 1]), ([0, 1], [0, -1])])
def test_confusion_matrix_rejects_out_of_range_classes(labels, preds):
  with pytest.raises(ValueError, match="must lie in"):
    metrics.confusion_matrix(np.array(labels), np.array(preds), 3)


def test_confusion_matrices_of_batches_add_up_to_the_whole():
  rng = np.random.default_rng(1)
  y, p = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
  cm = jax.jit(metrics.confusion_matrix, static_argnums=2)
  total = sum(cm(y[i:i + 8], p[i:i + 8], 4) for i in range(0, 40, 8))
  np.testing.assert_array_equal(total, skm.confusion_matrix(y, p, labels=range(4)))
  np.testing.assert_allclose(metrics.macro_f1(total), skm.f1_score(y, p, average="macro"),
                             atol=1e-6)


def np_dice(a, b):
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_dice_matches_hand_computation():
  rng = np.random.default_rng(3)
  pred = rng.random((3, 8, 8, 8)) < 0.3
  true = (rng.random((3, 8, 8, 8)) < 0.2).astype(np.int32)
  np.testing.assert_allclose(metrics.dice(pred, true), np_dice(pred, true), rtol=1e-6)
  true_unknown = true.copy()
  true_unknown[1] = -1
  valid = np.array([True, False, True])
  keep = [0, 2]
  want = np_dice(pred[keep], true[keep])
  np.testing.assert_allclose(metrics.dice(pred, true_unknown), want, rtol=1e-6)
  np.testing.assert_allclose(metrics.dice(pred, true, valid), want, rtol=1e-6)
  assert float(metrics.dice(np.zeros((2, 4)), np.zeros((2, 4)))) == 1.0
  assert float(metrics.dice(np.ones((2, 4)), np.zeros((2, 4)))) == 0.0
  with pytest.raises(ValueError, match="pred_mask shape"):
    metrics.dice(np.zeros((2, 4)), np.zeros((2, 5)))


def test_dice_terms_pool_over_batches():
  rng = np.random.default_rng(4)
  pred = rng.random((6, 4, 8, 8)) < 0.3
  true = (rng.random((6, 4, 8, 8)) < 0.1).astype(np.int32)
  terms = [jax.jit(metrics.dice_terms)(pred[i:i + 2], true[i:i + 2]) for i in range(0, 6, 2)]
  inter, total = (sum(t[j] for t in terms) for j in range(2))
  np.testing.assert_allclose(metrics.dice_from_terms(inter, total), np_dice(pred, true),
                             rtol=1e-6)
  # Pooled Dice is not the mean of per-batch Dice: the sums must be pooled.
  per_batch = np.mean([np_dice(pred[i:i + 2], true[i:i + 2]) for i in range(0, 6, 2)])
  assert abs(per_batch - np_dice(pred, true)) > 1e-4


def test_plot_confusion_matrix_writes_annotated_png(tmp_path):
  cm = np.array([[5, 1, 0, 0], [2, 7, 1, 0], [0, 3, 4, 2], [0, 0, 1, 9]])
  path = tmp_path / "plots" / "cm.png"
  fig = metrics.plot_confusion_matrix(cm, ["mild", "moderate", "severe", "critical"], path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts == [str(v) for v in cm.ravel()]
  assert f"{skm.f1_score(*expand(cm), average='macro'):.3f}" in fig.axes[0].get_title()
  with pytest.raises(ValueError, match="class_names"):
    metrics.plot_confusion_matrix(cm, ["a", "b"], path)


def expand(cm):
  """Label and prediction lists that have confusion matrix ``cm``."""
  pairs = [(i, j) for i in range(len(cm)) for j in range(len(cm)) for _ in range(cm[i, j])]
  return [i for i, _ in pairs], [j for _, j in pairs]
