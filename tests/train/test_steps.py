"""Train/eval steps, optimiser, EMA, non-finite handling, tasks (in-process, 1 device)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from covid3d import losses, train
from covid3d.data import schema
from covid3d.train import optim, steps, tasks


class TinyNet(nn.Module):
  """Stand-in with the model contract: conv -> pool -> dense, random per-example drop."""

  @nn.compact
  def __call__(self, x, deterministic=True):
    h = nn.Conv(4, (3, 3, 3))(x)
    h = jnp.mean(jax.nn.gelu(h), axis=(1, 2, 3))
    if not deterministic:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 0.7, (h.shape[0], 1))
      h = jnp.where(keep, h / 0.7, 0.0)
    return nn.Dense(3)(h)


def _setup(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, 4, 4, 4, 1)).astype(np.float32)
  y = np.array([0, 0, 0, 0, 0, 1, 1, 2][:batch], np.int32)
  model = TinyNet()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  return model, params, {"image": x, "label": y}


def _step(model, tx, task, mesh, **kw):
  return steps.make_train_step(train.flax_apply_fn(model), task.loss_fn, tx, mesh, **kw)


def test_schedules():
  config = train.default_config()
  config.update(learning_rate=1e-3, num_steps=100, schedule="cosine", warmup_steps=10,
                final_learning_rate=1e-6)
  s = optim.make_schedule(config)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + np.cos(np.pi * 45 / 90))
  np.testing.assert_allclose(float(s(55)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(s(100)), 1e-6, rtol=1e-5)
  config.schedule = "constant"
  assert float(optim.make_schedule(config)(77)) == pytest.approx(1e-3)
  config.schedule = "linear"
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(config)


def test_weight_decay_of_1d_parameters_follows_decay_1d():
  """decay_1d=False (the ImageNet recipe) leaves LayerNorm/bias/gamma vectors undecayed."""
  params = {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.ones(2, np.float32)},
            "norm": {"scale": np.ones(4, np.float32)},
            "block": {"dwconv": {"kernel": np.ones((7, 7, 1, 4), np.float32)},
                      "gamma": np.ones(4, np.float32)}}
  zero_grads = jax.tree.map(np.zeros_like, params)
  config = train.default_config()
  config.learning_rate, config.weight_decay = 0.1, 0.5
  moved = {}
  for decay_1d in (True, False):
    config.decay_1d = decay_1d
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    moved[decay_1d] = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
  assert all(jax.tree.leaves(moved[True]))   # the submissions' AdamW decays every parameter
  assert moved[False] == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                          "block": {"dwconv": {"kernel": True}, "gamma": False}}
  np.testing.assert_allclose(
      optax.apply_updates(params, updates)["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)


def test_ema_decay_defaults_and_update():
  assert optim.resolve_ema_decay(None, 4) == 0.99
  assert optim.resolve_ema_decay(None, 2) == 0.995
  assert optim.resolve_ema_decay(0.9, 2) == 0.9
  out = optim.ema_update({"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, -2.0])}, 0.75)
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2], rtol=1e-7)


def test_gradient_is_the_global_weighted_mean_for_any_micro_batch_split():
  """One SGD(lr=1) step = -grad of the whole batch's balanced CE, whatever the split."""
  model, params, batch = _setup()
  counts = [5, 2, 1]
  task = tasks.classification_task(3, class_counts=counts)
  mesh = steps.make_mesh()
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(3), 0), i)))(jnp.arange(8))

  def full_loss(p):  # independent: the model per example with the step's drop-path keys
    logits = jax.vmap(lambda x, k: model.apply({"params": p}, x[None], deterministic=False,
                                               rngs={"dropout": k})[0])(batch["image"], keys[:, 1])
    return losses.balanced_cross_entropy(logits, batch["label"], counts)

  expected = jax.tree.map(lambda p, g: p - g, params, jax.grad(full_loss)(params))
  for micro in (1, 2, 4):
    tx = optax.sgd(1.0)
    state = steps.replicate(train.create_state(params, tx, seed=3), mesh)
    step = _step(model, tx, task, mesh, ema_decay=0.9, micro_batches=micro)
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                 jax.device_get(state.params), expected)
    np.testing.assert_allclose(metrics["loss"], full_loss(params), rtol=1e-5)


def test_ema_and_nonfinite_steps():
  model, params, batch = _setup()
  task = tasks.classification_task(3)
  mesh = steps.make_mesh()
  config = train.default_config()
  config.learning_rate = 1e-2
  tx = optim.make_optimizer(config)
  step = _step(model, tx, task, mesh, ema_decay=0.9, augment_fn=None)
  state = steps.replicate(train.create_state(params, tx, seed=0), mesh)
  p0 = jax.device_get(state.params)
  state, _ = step(state, steps.shard_batch(batch, mesh))
  p1 = jax.device_get(state.params)
  state, _ = step(state, steps.shard_batch(batch, mesh))
  p2, ema = jax.device_get((state.params, state.ema_params))
  hand = jax.tree.map(lambda a, b, c: 0.9 * (0.9 * np.float64(a) + 0.1 * b) + 0.1 * c, p0, p1, p2)
  jax.tree.map(lambda e, h: np.testing.assert_allclose(e, h, rtol=1e-6, atol=1e-7), ema, hand)
  assert not np.allclose(jax.tree.leaves(p2)[0], jax.tree.leaves(p0)[0])

  before = jax.device_get(state)
  bad = dict(batch, image=batch["image"].copy())
  bad["image"][3] = np.nan
  for run in (1, 2):
    state, metrics = step(state, steps.shard_batch(bad, mesh))
    assert not metrics["finite"]
    assert int(metrics["nonfinite_run"]) == run and int(metrics["nonfinite_total"]) == run
  after = jax.device_get(state)
  for name in ("step", "params", "ema_params", "opt_state", "rng"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))
  state, metrics = step(state, steps.shard_batch(batch, mesh))
  assert metrics["finite"] and int(metrics["step"]) == 3
  assert int(metrics["nonfinite_run"]) == 0 and int(metrics["nonfinite_total"]) == 2


def test_bfloat16_compute_keeps_float32_master_params():
  model, params, batch = _setup()
  task = tasks.classification_task(3)
  mesh = steps.make_mesh()
  tx = optax.sgd(0.1)
  losses_by_dtype = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    state = steps.replicate(train.create_state(params, tx, seed=0), mesh)
    state, metrics = _step(model, tx, task, mesh, ema_decay=0.9, compute_dtype=dtype)(
        state, steps.shard_batch(batch, mesh))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    losses_by_dtype[dtype] = float(metrics["loss"])
  assert losses_by_dtype[jnp.bfloat16] == pytest.approx(losses_by_dtype[jnp.float32], rel=2e-2)


def test_augment_keys_are_per_example_and_step():
  """Example i of batch n is augmented with split(fold_in(fold_in(rng, n), i))[0]."""
  model, params, batch = _setup(batch=4)
  mesh = steps.make_mesh()
  tx = optax.sgd(0.0)

  def shift_augment(key, example):
    return {**example, "image": jnp.zeros_like(example["image"]) + jax.random.uniform(key)}

  def image_mean_loss(outputs, b):  # reports what the augmentation produced
    return jnp.mean(b["image"]) + 0.0 * jnp.sum(outputs), jnp.float32(b["image"].shape[0])

  state = steps.replicate(train.create_state(params, tx, seed=5), mesh)
  step = steps.make_train_step(train.flax_apply_fn(model), image_mean_loss, tx, mesh,
                               ema_decay=0.9, augment_fn=shift_augment, micro_batches=2)
  for n in range(2):
    state, metrics = step(state, steps.shard_batch(batch, mesh))
    base = jax.random.fold_in(jax.random.PRNGKey(5), n)
    shifts = [float(jax.random.uniform(jax.random.split(jax.random.fold_in(base, i))[0]))
              for i in range(4)]
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(shifts), rtol=1e-6)


@pytest.mark.parametrize("augmented", [False, True])
def test_volumes_as_cached_become_float32_on_the_devices(augmented):
  """uint8 volumes (image, image_large) arrive as v / 255 as the host decodes them; masks stay."""
  model, params, batch = _setup(batch=4)
  rng = np.random.default_rng(3)
  volumes = {k: rng.integers(0, 256, (4, 4, 4, 4, 1), np.uint8) for k in ("image", "image_large")}
  mask = rng.integers(0, 2, (4, 4, 4, 4, 1), np.uint8)
  mesh = steps.make_mesh()

  def report_loss(outputs, b):  # the step's inputs, summed in float32
    seen = sum(jnp.sum(b[k].astype(jnp.float32)) for k in ("image", "image_large", "mask"))
    return seen + 0.0 * jnp.sum(outputs), jnp.float32(1.0)

  tx = optax.sgd(0.0)
  step = steps.make_train_step(train.flax_apply_fn(model), report_loss, tx, mesh, ema_decay=0.9,
                               augment_fn=(lambda key, e: e) if augmented else None)
  state = steps.replicate(train.create_state(params, tx, seed=0), mesh)
  _, metrics = step(state, steps.shard_batch(dict(batch, **volumes, mask=mask), mesh))
  decoded = {k: schema.decode_volume(v) for k, v in volumes.items()}
  expected = sum(float(np.sum(v, dtype=np.float64)) for v in decoded.values()) + int(mask.sum())
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  assert float(metrics["loss"]) < 2 * mask.size  # the volumes were scaled by 1/255


def test_eval_step_sums_confusion_with_padding():
  model, params, batch = _setup()
  task = tasks.classification_task(3)
  mesh = steps.make_mesh()
  eval_step = steps.make_eval_step(train.flax_apply_fn(model), task.eval_fn, mesh)
  valid = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  sums, examples = jax.device_get(eval_step(params,
                                            steps.shard_batch(dict(batch, valid=valid), mesh)))
  assert examples == {}                       # classification sums only
  logits = model.apply({"params": params}, batch["image"])
  preds = np.argmax(np.asarray(logits), -1)
  cm = np.zeros((3, 3), int)
  for t, p in zip(batch["label"][:6], preds[:6], strict=True):
    cm[t, p] += 1
  np.testing.assert_array_equal(sums["confusion"], cm)
  assert sums["count"] == 6
  summary = task.summarize(sums)
  assert summary["accuracy"] == pytest.approx(np.trace(cm) / 6)
