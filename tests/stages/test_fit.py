"""A stage trains from the weights it loaded, and its step learns (covid3d.stages.fit)."""
import jax
import numpy as np
import pytest

from covid3d.data import phantom
from covid3d.data.read_common import hu_to_unit
from covid3d import config as base_config
from covid3d.inference import build
from covid3d.stages import initial_params, registry
from covid3d.train import optim, steps, tasks
from covid3d.train.state import create_state


class _FirstStep(Exception):
  """Stops a stage at its first training step (nothing needs compiling)."""


@pytest.mark.slow   # the stage makes its phantom data first
def test_a_stage_starts_training_from_the_weights_it_loaded(tmp_path, monkeypatch, shrink):
  """The parameters the first step receives are the source's, leaf for leaf."""
  source_dir = tmp_path / "source"   # a folder: init_from passes the cheap checks
  source_dir.mkdir()
  config = shrink("segmentation", tmp_path, init_from=str(source_dir))
  model = build.make_model(config, {}, segmentation=True)
  shapes = jax.eval_shape(lambda: build.init_params(model, config, min(config.data.sizes)))
  rng = np.random.default_rng(0)
  source = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  monkeypatch.setattr(initial_params, "read_source", lambda src, slice_axis: source)
  seen = []

  def make_train_step(*args, **kwargs):
    del args, kwargs

    def first_step(state, batch):
      del batch
      seen.append(jax.device_get(state.params))
      raise _FirstStep
    return first_step

  monkeypatch.setattr(steps, "make_train_step", make_train_step)
  with pytest.raises(_FirstStep):
    registry.run(config, str(tmp_path / "work"))
  (first,) = seen
  got = jax.tree_util.tree_leaves_with_path(first)
  want = jax.tree_util.tree_leaves_with_path(source)
  assert [path for path, _ in got] == [path for path, _ in want]
  for (path, a), (_, b) in zip(got, want, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_the_segmentation_step_learns_a_fixed_phantom_batch():
  """Nano model, 32^3: over 30 steps on two phantom scans the loss falls, by a fifth or more."""
  config = base_config.load("segmentation:demo")
  config.model.variant = "nano"
  config.train.learning_rate = 1e-3
  scans = [phantom.make_scan(seed, kind="covid", severity=3, shape=(32, 32, 32))
           for seed in (0, 1)]
  batch = {"image": np.stack([hu_to_unit(v) for v, _, _ in scans])[..., None],
           "mask": np.stack([m for _, m, _ in scans]).astype(np.float32)}
  assert 0 < batch["mask"].mean() < 0.5
  model = build.make_model(config, {}, segmentation=True)
  params = build.init_params(model, config, 32)
  task = tasks.segmentation_task("mask")
  tx = optim.make_optimizer(config.train)
  mesh = steps.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(build.apply_fn(model, config, "segmentation"), task.loss_fn, tx,
                               mesh, ema_decay=0.0)
  state = steps.replicate(create_state(params, tx, 0), mesh)
  sharded = steps.shard_batch(batch, mesh)
  losses = []
  for _ in range(30):
    state, metrics = step(state, sharded)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
