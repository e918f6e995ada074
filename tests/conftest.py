"""Fixtures shared by the tests of every folder.

- ``cache_root`` (every test): the cache root (covid3d.cachedir) is a fresh
  folder of this session, so no test reads or writes ``~/.cache/covid3d``;
  subprocesses inherit the variable.
- ``shrink``: a stage's config (``covid3d.config.load``) cut to seconds: 8
  phantom scans per dataset under a given folder, 2 folds, 2 steps, batch 2.
- ``run_stage``: runs such a config through ``covid3d.stages.registry``.
- ``compilation_cache``: identical step programs of different stages compile
  once (one XLA cache folder for the session).
- ``chain``: the whole stage chain (``chain.STAGES``) run once per session
  with ``shrink``'s sizes; its root folder. Minutes on 2 cores, so only
  ``slow`` tests use it.
"""
import os

import jax
import pytest

from covid3d import cachedir
from covid3d import config as base_config
from covid3d.stages import chain as stage_chain
from covid3d.stages import registry

# What ``shrink`` sets: the smallest run that still has every part of a stage.
SMALL = {"data.phantom_scans": 8, "data.folds": 2, "data.workers": 1, "train.num_steps": 2,
         "train.warmup_steps": 0, "train.eval_every": 2, "train.checkpoint_every": 2,
         "train.batch_size": 2, "train.eval_batch_size": 4, "train.progress_bar": False}


@pytest.fixture(scope="session", autouse=True)
def cache_root(tmp_path_factory):
  old = os.environ.get(cachedir.ENV)
  os.environ[cachedir.ENV] = str(tmp_path_factory.mktemp("covid3d_cache"))
  yield os.environ[cachedir.ENV]
  if old is None:
    del os.environ[cachedir.ENV]
  else:
    os.environ[cachedir.ENV] = old


def _set(c, key: str, value):
  *parents, leaf = key.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


def shrink_config(name: str, root, arg: str = "demo", **overrides):
  """``configs/<name>.py:<arg>`` with the phantom under ``root/data`` and ``SMALL``'s sizes.

  ``overrides`` are dotted field names (``**{"data.folds": 1}``) or top-level
  fields (``init_from=...``), applied last.
  """
  c = base_config.load(f"{name}:{arg or ''}")
  c.data.phantom_dir = str(root / "data")
  for key, value in {**SMALL, **overrides}.items():
    _set(c, key, value)
  return c


@pytest.fixture(scope="session")
def shrink():
  return shrink_config


@pytest.fixture(scope="session")
def run_stage():
  """``run_stage(name, root, workdir, arg="demo", **overrides)`` -> ``root/workdir``, run."""
  def run(name, root, workdir, arg="demo", **overrides):
    registry.run(shrink_config(name, root, arg, **overrides), str(root / workdir))
    return root / workdir
  return run


@pytest.fixture(scope="session")
def _xla_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def compilation_cache(_xla_cache_dir):
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", _xla_cache_dir)
  yield
  jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="session")
def chain(tmp_path_factory, run_stage, _xla_cache_dir):
  """Each stage the chain runs (``chain.STAGES``), in its order, with its hand-offs.

  Every workdir is ``root/<config>``; of the fine-tuning runs, severity alone,
  from multitask (2 folds). Returns the root.
  """
  root = tmp_path_factory.mktemp("chain")
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", _xla_cache_dir)
  try:
    for stage in stage_chain.STAGES:
      if not stage.chained or stage.kind != "stage":
        continue
      config, init = (("severity", "multitask") if stage.per_target
                      else (stage.configs[0], (*stage.init_from, "")[0]))
      hand_offs = {"init_from": init, "pseudo_labels": stage.pseudo_labels}
      run_stage(config, root, config, **{k: str(root / v) for k, v in hand_offs.items() if v})
  finally:
    jax.config.update("jax_compilation_cache_dir", old)
  return root
