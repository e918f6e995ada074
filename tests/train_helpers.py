"""Shared pieces of the tests/train/ files, and their subprocess worker.

``python tests/train_helpers.py '<json>'`` runs ``train_and_evaluate`` on a
small ConvNeXt with the devices/processes given by the environment and
``jax.distributed`` fields of the JSON, then writes the final parameters
(and EMA parameters) of this process to ``out`` (.npz) and a JSON summary.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 32       # volume edge, voxels (ConvNeXt needs a multiple of 32)
NUM_CLASSES = 4


def dataset(n: int = 16, seed: int = 0) -> dict:
  """n random volumes (n, 32, 32, 32, 1) float32 whose label shifts their mean."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  images = rng.normal(size=(n, SIZE, SIZE, SIZE, 1)).astype(np.float32) + labels[:, None, None,
                                                                                 None, None]
  return {"image": images, "label": labels}


def flip_noise_augment(key, example):
  """A cheap random augmentation of one example: flip along D with p 0.5, plus noise."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  k_flip, k_noise = jax.random.split(key)
  image = example["image"]
  image = jnp.where(jax.random.bernoulli(k_flip), image[::-1], image)
  image = image + 0.1 * jax.random.normal(k_noise, image.shape)
  return {**example, "image": image}


def run_worker(args: dict, devices: int = 1, cache_dir: str | None = None, wait: bool = True,
               extra_env: dict | None = None):
  """Starts the worker in a subprocess with ``devices`` simulated CPU devices.

  Returns the completed process (``wait``) or the Popen object.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra_env or {})
  cmd = [sys.executable, os.path.join(HERE, "train_helpers.py"), json.dumps(args)]
  if not wait:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def distributed_flags(port: int, processes: int, pid: int) -> list[str]:
  """The ``covid3d.main`` flags that make process ``pid`` of ``processes`` join a
  jax.distributed run coordinated on 127.0.0.1:``port``."""
  return ["--config.train.distributed.initialize=True",
          f"--config.train.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.train.distributed.num_processes={processes}",
          f"--config.train.distributed.process_id={pid}"]


def wait_all(procs, timeout: float = 600) -> list[str]:
  """The outputs of ``procs`` (``run_worker(wait=False)``) once all have exited.

  The first to exit with an error, or the timeout, ends the others at once
  (they would wait for it in a collective). Each output is drained as it
  comes, so no process blocks on a full pipe.
  """
  outputs = [[] for _ in procs]
  readers = [threading.Thread(target=out.extend, args=(proc.stdout,), daemon=True)
             for proc, out in zip(procs, outputs, strict=True)]
  for reader in readers:
    reader.start()
  deadline = time.monotonic() + timeout
  while any(proc.poll() is None for proc in procs):
    if any(proc.returncode for proc in procs) or time.monotonic() > deadline:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
    time.sleep(0.1)
  for reader in readers:
    reader.join()
  return ["".join(out) for out in outputs]


def worker_args(workdir: str, out: str, **overrides) -> dict:
  args = dict(workdir=workdir, out=out, num_steps=4, batch_size=8, micro_batches=1,
              checkpoint_every=2, eval_every=0, hang_at_batch=-1, nan_batches=[],
              max_nonfinite=10, augment=True, seed=0, coordinator=None, num_processes=1,
              process_id=0, learning_rate=1e-3, eps=1e-3, log_info=False)
  args.update(overrides)
  return args


class _ScriptedIterator:
  """ArrayIterator that can hang forever or yield NaN images at given batch counts."""

  def __init__(self, inner, hang_at_batch: int, nan_batches):
    self.inner, self.hang_at_batch, self.nan_batches = inner, hang_at_batch, set(nan_batches)
    self.count = 0
    self.drawn = 0  # batches drawn by this process (not part of the saved state)

  def __next__(self):
    self.drawn += 1
    if self.count == self.hang_at_batch:
      print("HANGING", flush=True)
      time.sleep(3600)
    batch = next(self.inner)
    if self.count in self.nan_batches:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    self.count += 1
    return batch

  def get_state(self):
    return {"inner": self.inner.get_state(), "count": self.count}

  def set_state(self, state):
    self.inner.set_state(state["inner"])
    self.count = state["count"]


def small_convnext():
  """A 4-stage ConvNeXt, one block of 8 channels per stage; layer scale 1 keeps the
  block gradients far above float32 rounding noise."""
  from covid3d.models import ConvNeXt  # pylint: disable=import-outside-toplevel
  return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=NUM_CLASSES,
                  drop_path_rate=0.2, layer_scale_init=1.0, dwconv_impl="fft")


def _worker(args: dict):
  import jax  # pylint: disable=import-outside-toplevel
  if args["log_info"]:
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.set_verbosity(logging.INFO)
  from covid3d import train  # pylint: disable=import-outside-toplevel
  from covid3d.train.iterators import ArrayIterator  # pylint: disable=import-outside-toplevel

  config = train.default_config()
  config.update(num_steps=args["num_steps"], batch_size=args["batch_size"],
                eval_batch_size=args["batch_size"], micro_batches=args["micro_batches"],
                checkpoint_every=args["checkpoint_every"], eval_every=args["eval_every"],
                max_nonfinite_in_a_row=args["max_nonfinite"],
                seed=args["seed"], learning_rate=args["learning_rate"], eps=args["eps"],
                log_every=1, progress_bar=False)
  if args["coordinator"]:
    config.distributed.update(initialize=True, coordinator_address=args["coordinator"],
                              num_processes=args["num_processes"], process_id=args["process_id"])
  train.init_distributed(config)

  model = small_convnext()
  data = dataset()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), data["image"][:1])["params"]
  pid, nproc = jax.process_index(), jax.process_count()
  iterator = _ScriptedIterator(
      ArrayIterator(data, args["batch_size"], seed=1, process_index=pid, process_count=nproc),
      args["hang_at_batch"], args["nan_batches"])
  eval_batches = None
  if args["eval_every"]:
    # 6 validation examples split over the processes: one padded batch each.
    n_eval = 6 // nproc
    eval_batches = lambda: [{k: v[pid * n_eval:(pid + 1) * n_eval] for k, v in data.items()}]
  task = train.classification_task(NUM_CLASSES, class_counts=[3, 5, 4, 4])
  summary = {}
  try:
    result = train.train_and_evaluate(config, args["workdir"], model, params, iterator, task,
                                      eval_batches=eval_batches,
                                      augment_fn=flip_noise_augment if args["augment"] else None)
    state = result["state"]
    summary.update(step=result["step"], best_step=result["best_step"], eval=result["eval"],
                   nonfinite_total=result["nonfinite_total"])
  except train.NonFiniteError as e:
    summary.update(error=str(e))
    state = None
  summary["batches_drawn"] = iterator.drawn
  if state is not None:
    host = jax.device_get({"params": state.params, "ema": state.ema_params})
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(host)}
    np.savez(args["out"], **flat)
  with open(args["out"] + ".json", "w", encoding="utf-8") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  _worker(json.loads(sys.argv[1]))


def load_params(path: str) -> dict:
  with np.load(path) as f:
    return dict(f)


def assert_trees_equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def folder_state(root) -> dict:
  """Every entry under ``root`` (path relative to it) -> (mode, mtime in ns, size, sha256 of a
  file's bytes): compared before and after a read, it shows any file created, removed or
  changed, even where permissions do not stop a writer (as root)."""
  state = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      st = os.lstat(path)
      digest = ""
      if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      state[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
  return state


def read_only_copy(src, dst) -> dict:
  """A copy of the folder ``src`` at ``dst``, made read-only (``chmod -R a-w``); returns its
  `folder_state`."""
  shutil.copytree(src, dst, symlinks=True)
  for folder, dirs, files in os.walk(dst):
    for name in dirs + files:
      path = os.path.join(folder, name)
      if not os.path.islink(path):
        os.chmod(path, os.lstat(path).st_mode & ~0o222)
  os.chmod(dst, os.lstat(dst).st_mode & ~0o222)
  return folder_state(dst)

