"""Exact resume after SIGKILL, SIGTERM checkpointing, non-finite stop (subprocess runs).

Every run is ``tests/train_helpers.py`` (a small ConvNeXt, 32^3 volumes, batch 8,
augmentation and drop path on); they share one compilation cache.
"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

import train_helpers as h
from covid3d.train import checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
  work = tmp_path_factory.mktemp("uninterrupted")
  out = str(work / "params.npz")
  r = h.run_worker(h.worker_args(str(work / "run"), out, num_steps=STEPS, eval_every=3),
                   cache_dir=cache)
  assert r.returncode == 0, r.stdout + r.stderr
  return work, h.load_params(out)


def _wait_for(path: str, proc, seconds: float = 300.0):
  deadline = time.time() + seconds
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.2)


def _rows(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_killed_run_resumes_bit_exact(tmp_path, cache, uninterrupted):
  run, out = str(tmp_path / "run"), str(tmp_path / "params.npz")
  args = h.worker_args(run, out, num_steps=STEPS, eval_every=3, hang_at_batch=5, log_info=True)
  proc = h.run_worker(args, cache_dir=cache, wait=False)
  _wait_for(os.path.join(run, "checkpoints", "4"), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(out)
  ckpt = checkpoint.Checkpointer.open(os.path.join(run, "checkpoints"))
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest == 4  # checkpoints every 2 steps and at the evaluation of step 3
  metrics = os.path.join(run, "metrics.jsonl")
  before = _rows(metrics)
  assert [r["step"] for r in before if r["split"] == "train"][:latest] == list(range(1, latest + 1))
  r = h.run_worker(dict(args, hang_at_batch=-1), cache_dir=cache)
  assert r.returncode == 0, r.stdout + r.stderr
  h.assert_trees_equal(h.load_params(out), uninterrupted[1])
  resumed = json.load(open(out + ".json"))
  expected = json.load(open(str(uninterrupted[0] / "params.npz.json")))
  # It really resumed: the restart drew only the batches of the steps after
  # the checkpoint, logged them (appended to metrics.jsonl) and said so.
  assert resumed.pop("batches_drawn") == STEPS - latest
  assert expected.pop("batches_drawn") == STEPS
  assert resumed == expected and resumed["step"] == STEPS
  assert resumed["best_step"] in (3, 6)
  assert f"resumed from step {latest} in {run}" in r.stdout + r.stderr
  after = _rows(metrics)
  assert after[:len(before)] == before
  new = after[len(before):]
  assert [(row["step"], row["split"]) for row in new] == (
      [(s, "train") for s in range(latest + 1, STEPS)] + [(STEPS, "train"), (STEPS, "eval")])
  # The same losses as the uninterrupted run at those steps (bit-exact resume).
  clean = {(row["step"], row["split"]): row
           for row in _rows(str(uninterrupted[0] / "run" / "metrics.jsonl"))}
  for row in new:
    for name in ("loss", "grad_norm", "learning_rate", "macro_f1"):
      if name in row:
        assert row[name] == clean[(row["step"], row["split"])][name], (row, name)


def test_sigterm_writes_a_checkpoint_then_exits(tmp_path, cache):
  run = str(tmp_path / "run")
  proc = h.run_worker(h.worker_args(run, str(tmp_path / "p.npz"), num_steps=100,
                                    checkpoint_every=100), cache_dir=cache, wait=False)
  metrics = os.path.join(run, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM
  steps = [int(d) for d in os.listdir(os.path.join(run, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 100


def test_nonfinite_run_stops_with_last_good_checkpoint(tmp_path, cache, uninterrupted):
  run, out = str(tmp_path / "run"), str(tmp_path / "p.npz")
  r = h.run_worker(h.worker_args(run, out, num_steps=STEPS, eval_every=3, nan_batches=[4, 5, 6],
                                 max_nonfinite=3), cache_dir=cache)
  assert r.returncode == 0, r.stdout + r.stderr
  error = json.load(open(out + ".json"))["error"]
  assert "3 consecutive steps" in error and "latest checkpoint is step 4" in error
  assert sorted(int(d) for d in os.listdir(os.path.join(run, "checkpoints"))
                if d.isdigit()) == [3, 4]
  # The kept checkpoint of step 4 equals step 4 of the clean run.
  for ema in (False, True):
    saved = [checkpoint.Checkpointer(os.path.join(d, "checkpoints"), 2, "macro_f1")
             .restore_params(4, ema=ema) for d in (run, str(uninterrupted[0] / "run"))]
    assert len(jax.tree.leaves(saved[0])) > 10
    jax.tree.map(np.testing.assert_array_equal, *saved)


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, cache, uninterrupted):
  """Resuming a finished run's checkpoint with another learning rate stops with one line."""
  work, _ = uninterrupted
  run = str(work / "run")
  latest = checkpoint.Checkpointer.open(os.path.join(run, "checkpoints")).latest_step()
  r = h.run_worker(h.worker_args(run, str(tmp_path / "p.npz"), num_steps=STEPS, eval_every=3,
                                 learning_rate=2e-3), cache_dir=cache)
  assert r.returncode != 0
  assert "SettingsChanged" in r.stderr
  assert (f"{run} (checkpoint of step {latest}) holds a run with other settings "
          "(learning_rate: 0.001 -> 0.002)") in r.stderr
  assert checkpoint.Checkpointer.open(os.path.join(run, "checkpoints")).latest_step() == latest
