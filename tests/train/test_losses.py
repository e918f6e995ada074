"""Losses against hand computations in numpy (and PyTorch where installed)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d import losses

SEVERITY_COUNTS = np.array([85, 62, 85, 26])


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_weighted_ce(logits, labels, w):
  """sum(w_y * nll) / sum(w_y) over examples with label >= 0, in float64."""
  keep = labels >= 0
  nll = -np_log_softmax(logits.astype(np.float64))[np.arange(len(labels)), np.maximum(labels, 0)]
  wy = w[np.maximum(labels, 0)] * keep
  return (wy * nll).sum() / wy.sum()


def random_batch(seed, b=12, k=4, unknown=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, k)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=b).astype(np.int32)
  labels[rng.choice(b, unknown, replace=False)] = -1
  return logits, labels


def test_class_weights_reproduce_the_severity_weights():
  w = np.asarray(losses.class_weights(SEVERITY_COUNTS))
  np.testing.assert_allclose(np.round(w / 4, 2), [0.15, 0.21, 0.15, 0.49])
  inv = 1.0 / SEVERITY_COUNTS
  np.testing.assert_allclose(w, 4 * inv / inv.sum(), rtol=1e-6)
  np.testing.assert_allclose(w.sum(), 4.0, rtol=1e-6)
  np.testing.assert_allclose(losses.class_weights([5, 5, 5]), [1.0, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 2], [], [[1, 2]], [4, -1]])
def test_class_weights_reject_bad_counts(counts):
  with pytest.raises(ValueError, match="class_counts"):
    losses.class_weights(counts)


def test_cross_entropy_matches_hand_computation():
  logits, labels = random_batch(0)
  w = np.array([0.5, 1.0, 2.0, 3.0])
  got = losses.cross_entropy(logits, labels, weights=w)
  np.testing.assert_allclose(got, np_weighted_ce(logits, labels, w), rtol=1e-5)
  got_plain = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(got_plain, np_weighted_ce(logits, labels, np.ones(4)), rtol=1e-5)


def test_balanced_cross_entropy_matches_hand_computation_and_jit():
  logits, labels = random_batch(1)
  w = 4 * (1 / SEVERITY_COUNTS) / (1 / SEVERITY_COUNTS).sum()
  want = np_weighted_ce(logits, labels, w)
  np.testing.assert_allclose(losses.balanced_cross_entropy(logits, labels, SEVERITY_COUNTS),
                             want, rtol=1e-5)
  jitted = jax.jit(losses.balanced_cross_entropy)
  np.testing.assert_allclose(jitted(logits, labels, SEVERITY_COUNTS), want, rtol=1e-5)


def test_balanced_cross_entropy_matches_torch():
  torch = pytest.importorskip("torch")
  logits, labels = random_batch(2, b=32)
  w = np.asarray(losses.class_weights(SEVERITY_COUNTS))
  want = torch.nn.functional.cross_entropy(
      torch.tensor(logits, dtype=torch.float64), torch.tensor(labels, dtype=torch.long),
      weight=torch.tensor(w, dtype=torch.float64), ignore_index=-1)
  got = losses.balanced_cross_entropy(logits, labels, SEVERITY_COUNTS)
  np.testing.assert_allclose(got, want.item(), rtol=1e-5)


def test_unknown_and_masked_examples_are_left_out_not_zero():
  logits, labels = random_batch(3)
  keep = labels >= 0
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             losses.cross_entropy(logits[keep], labels[keep]), rtol=1e-6)
  mask = np.arange(len(labels)) % 2 == 0
  both = keep & mask
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask=mask),
                             losses.cross_entropy(logits[both], labels[both]), rtol=1e-6)


def test_no_labelled_example_gives_zero_loss_and_finite_grads():
  logits = jnp.ones((4, 3))
  labels = -jnp.ones((4,), jnp.int32)
  loss, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  loss, grad = jax.value_and_grad(losses.balanced_cross_entropy)(logits, labels, [1, 2, 3])
  assert float(loss) == 0.0 and np.all(np.isfinite(grad))


def np_segmentation_loss(logits, mask, valid, per_example):
  """(1 - Dice with eps 1) + mean BCE, in float64, over counted voxels."""
  x = logits.astype(np.float64).reshape(len(logits), -1)
  t = mask.astype(np.float64).reshape(len(mask), -1)
  w = (t >= 0) * valid[:, None]
  t = np.clip(t, 0, 1)
  p = 1 / (1 + np.exp(-x))
  bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  bce = (w * bce).sum() / w.sum()
  if per_example:
    rows = [i for i in range(len(x)) if w[i].any()]
    d = [(2 * (w[i] * p[i] * t[i]).sum() + 1) / ((w[i] * p[i]).sum() + (w[i] * t[i]).sum() + 1)
         for i in rows]
    dice_loss = 1 - np.mean(d)
  else:
    dice_loss = 1 - (2 * (w * p * t).sum() + 1) / ((w * p).sum() + (w * t).sum() + 1)
  return dice_loss + bce


def seg_batch(seed, b=3, n=8):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, n, n, n, 1)).astype(np.float32) * 2
  mask = (rng.random((b, n, n, n)) < 0.2).astype(np.int32)
  return logits, mask


@pytest.mark.parametrize("per_example", [False, True])
def test_segmentation_loss_matches_hand_computation(per_example):
  logits, mask = seg_batch(4)
  mask[0, :2] = -1  # unknown voxels
  valid = np.array([True, False, True])
  got = losses.segmentation_loss(logits, mask, valid=valid, per_example=per_example)
  want = np_segmentation_loss(logits, mask, valid, per_example)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A trailing channel axis on the mask gives the same value.
  got_c = losses.segmentation_loss(logits, mask[..., None], valid=valid, per_example=per_example)
  np.testing.assert_allclose(got_c, want, rtol=1e-5)


def test_segmentation_bce_matches_torch():
  torch = pytest.importorskip("torch")
  logits, mask = seg_batch(5)
  x, t = torch.tensor(logits[..., 0]), torch.tensor(mask, dtype=torch.float32)
  p = torch.sigmoid(x)
  dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
  want = 1 - dice + torch.nn.functional.binary_cross_entropy_with_logits(x, t)
  np.testing.assert_allclose(losses.segmentation_loss(logits, mask, per_example=False),
                             want.item(), rtol=1e-5)


def test_segmentation_loss_batch_and_per_example_differ_and_rank_predictions():
  logits, mask = seg_batch(6)
  a = losses.segmentation_loss(logits, mask, per_example=False)
  b = losses.segmentation_loss(logits, mask)
  assert abs(float(a) - float(b)) > 1e-4
  good = np.where(mask[..., None] > 0, 8.0, -8.0).astype(np.float32)
  assert float(losses.segmentation_loss(good, mask)) < 0.01 < float(a)


def test_segmentation_loss_without_valid_examples_is_zero_with_finite_grads():
  logits, mask = seg_batch(7)
  for per_example in (False, True):
    f = lambda x: losses.segmentation_loss(x, mask, valid=np.zeros(3, bool),
                                           per_example=per_example)
    loss, grad = jax.value_and_grad(f)(jnp.asarray(logits))
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_segmentation_loss_rejects_mismatched_mask():
  with pytest.raises(ValueError, match="mask shape"):
    losses.segmentation_loss(np.zeros((2, 4, 4, 4, 1)), np.zeros((2, 4, 4, 5)))


def multitask_batch(seed):
  logits, labels = random_batch(seed, b=3, unknown=1)
  seg_logits, mask = seg_batch(seed)
  mask[1] = -1  # example 1 has no mask
  outputs = {"severity": logits, "segmentation": seg_logits}
  batch = {"severity": labels, "segmentation": mask}
  return outputs, batch


def test_multitask_loss_is_the_weighted_sum_of_masked_head_losses():
  """The segmentation term is one Dice per scan, averaged (the authors' multitask loss)."""
  outputs, batch = multitask_batch(8)
  weights = {"severity": 0.7, "segmentation": 1.3}
  got = losses.multitask_loss(outputs, batch, weights)
  valid = np.array([True, False, True])
  want = (0.7 * np_weighted_ce(outputs["severity"], batch["severity"], np.ones(4))
          + 1.3 * np_segmentation_loss(outputs["segmentation"], batch["segmentation"],
                                       valid, True))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  cw = {"severity": losses.class_weights(SEVERITY_COUNTS)}
  got_w = jax.jit(lambda o, b: losses.multitask_loss(o, b, weights, cw))(outputs, batch)
  sev = outputs["severity"], batch["severity"]
  want_w = want + 0.7 * (np_weighted_ce(*sev, np.asarray(cw["severity"]))
                         - np_weighted_ce(*sev, np.ones(4)))
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5)


def test_multitask_head_without_labels_contributes_zero_and_no_nan():
  outputs, batch = multitask_batch(9)
  batch["severity"] = -np.ones(3, np.int32)
  weights = {"severity": 1.0, "segmentation": 1.0}
  f = jax.jit(lambda o: losses.multitask_loss(o, batch, weights))
  loss, grads = jax.value_and_grad(f)(jax.tree.map(jnp.asarray, outputs))
  seg_only = losses.segmentation_loss(outputs["segmentation"], batch["segmentation"],
                                      valid=np.array([True, False, True]))
  np.testing.assert_allclose(loss, seg_only, rtol=1e-6)
  assert np.all(np.asarray(grads["severity"]) == 0.0)
  assert np.all(np.isfinite(grads["segmentation"]))
  parts = losses.head_losses(outputs, batch)
  assert float(parts["severity"]) == 0.0


def test_multitask_loss_rejects_heads_without_weight_or_targets():
  outputs, batch = multitask_batch(10)
  with pytest.raises(KeyError, match="weight"):
    losses.multitask_loss(outputs, batch, {"severity": 1.0})
  with pytest.raises(KeyError, match="no targets"):
    losses.multitask_loss(outputs, {"severity": batch["severity"]},
                          {"severity": 1.0, "segmentation": 1.0})
