"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``. ``state`` is the
whole ``TrainState`` (saved asynchronously), ``data`` one JSON file per process
with that process's iterator state (``iterator.get_state()``), ``config`` the
resolved config as JSON. The latest ``keep`` checkpoints are kept, plus the best
one by an evaluation metric (checkpoints saved at an evaluation carry the
metrics); ``<workdir>/checkpoints/checkpointer.json`` records that metric's
name, so a later reader (the next stage) picks the same best checkpoint.

Which evaluation is the best is decided when it is saved, as the authors' code
does: a later one replaces the best only if its metric exceeds the best's by
more than ``min_gain`` (``ties='earliest'``: equal maxima keep the earliest), or,
with ``ties='latest'``, if it equals or exceeds it. The outcome is saved with the
metrics as ``SELECTION``, a rank that only the current best holds at its
highest, so Orbax keeps and names that checkpoint.
Paths may be local or ``gs://``.
"""
import dataclasses
import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from covid3d import storage

RECORD = "checkpointer.json"
SELECTION = "selection_rank"   # saved with an evaluated checkpoint's metrics; see above
TIES = ("earliest", "latest")


def _value(metrics: dict, name: str) -> float:
  """``metrics[name]``; a NaN (e.g. an AUC with one class absent) as -inf, which never wins."""
  value = float(metrics[name])
  return value if value == value else float("-inf")


class IteratorStateHandler(ocp.CheckpointHandler):
  """Each process writes and reads its own JSON file of iterator state."""

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "IteratorSave"):
    self._path(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "IteratorRestore | None" = None):
    path = self._path(directory)
    if not path.exists():
      raise FileNotFoundError(f"no data-iterator state for this process: {path} "
                              "(was the checkpoint written with another process count?)")
    return json.loads(path.read_text())


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Saves and restores (state, iterator state, config) under ``directory``.

  Args:
    directory: str, local or gs:// path (created if missing).
    keep: int >= 1, latest checkpoints kept.
    best_metric: name of the metric (higher is better) whose best checkpoint
      is kept besides the latest ones; recorded in the directory. None: read
      it from the directory (a run's checkpoints opened for reading; see
      ``open``).
    timeout_s: float, seconds a save (its synchronous part, then the wait for
      its background writes) may take before `storage.StorageTimeout`; a
      checkpointer that timed out refuses further saves at once.
    min_gain: float >= 0, what a later evaluation must exceed the best by to
      replace it (``ties='earliest'``).
    ties: 'earliest' (the authors' rule above) or 'latest' (a later evaluation
      that equals the best replaces it; ``min_gain`` unused).
    read_only: create, change and delete nothing under ``directory`` (a
      finished run's checkpoints read by a later stage or by inference, which
      may not write there); it must exist.
  """

  def __init__(self, directory: str, keep: int, best_metric: str | None,
               timeout_s: float = 600.0, min_gain: float = 0.0, ties: str = "earliest",
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    if ties not in TIES:
      raise ValueError(f"train.best_ties must be one of {TIES}, got {ties!r}")
    if min_gain < 0:
      raise ValueError(f"train.best_min_gain must be >= 0, got {min_gain}")
    self.min_gain, self.ties = float(min_gain), ties
    self._best = None   # (rank, metric value) of the best evaluation, once looked up
    directory = storage.as_path(directory)   # Orbax needs a local path absolute
    record = directory / RECORD
    if best_metric is None and record.exists():
      best_metric = json.loads(record.read_text())["best_metric"]
    self.best_metric = best_metric
    mode = dict(create=not read_only, read_only=read_only,
                save_root_metadata=not read_only, enable_async_checkpointing=True)
    if best_metric is None:
      options = ocp.CheckpointManagerOptions(**mode)
    else:
      # The rank decided at saving; the metric itself in directories written without one.
      metric = lambda metrics: (metrics[SELECTION] if SELECTION in metrics
                                else _value(metrics, best_metric))
      policy = policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=metric, n=1, keep_checkpoints_without_metrics=False)])
      # best_fn makes the manager store the metrics and answer best_step().
      options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=metric,
                                             best_mode="max", **mode)
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data", "config"))
    self.timeout_s = timeout_s
    self._stuck = None   # the StorageTimeout of a save that never finished
    if best_metric is not None and not read_only and jax.process_index() == 0:
      storage.write_json(record, {"best_metric": best_metric})

  @classmethod
  def open(cls, directory: str) -> "Checkpointer":
    """The checkpoints of a run, read only, with the best metric that run recorded."""
    return cls(directory, keep=1, best_metric=None, read_only=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the highest ``best_metric`` (None if none was evaluated)."""
    return self.manager.best_step() if self.best_metric is not None else None

  def save(self, step: int, state, iterator_state, config: ml_collections.ConfigDict,
           metrics: dict | None = None):
    """Starts an async save of ``state`` (returns once it was copied off the devices)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=IteratorSave(iterator_state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    clean = None if metrics is None else {k: float(v) for k, v in metrics.items()
                                          if jax.numpy.ndim(v) == 0}
    if clean is not None and self.best_metric is not None:
      clean[SELECTION] = self._rank(_value(clean, self.best_metric))
    self._bounded(lambda: self.manager.save(step, args=args, metrics=clean, force=True),
                  f"checkpoint of step {step} to {self.manager.directory}")

  def _rank(self, value: float) -> float:
    """The ``SELECTION`` rank of an evaluation with metric ``value``; it becomes the best or not.

    The best's rank + 1 when it replaces the best (0 for the first), else the
    best's rank - 0.5: below the best's, and distinct from every earlier rank.
    """
    if self._best is None:
      step = self.best_step()
      saved = self.manager.metrics(step) if step is not None else None
      if saved:
        self._best = (float(saved.get(SELECTION, 0.0)), _value(saved, self.best_metric))
    if self._best is None:
      replaces = True
      rank = 0.0
    else:
      best_rank, best_value = self._best
      replaces = (value > best_value + self.min_gain if self.ties == "earliest"
                  else value >= best_value)
      rank = best_rank + 1.0 if replaces else best_rank - 0.5
    if replaces:
      self._best = (rank, value)
    return rank

  def _bounded(self, fn, what: str):
    """``fn()`` within ``timeout_s`` (see the class docstring)."""
    if self._stuck is not None:
      raise self._stuck
    try:
      return storage.within(self.timeout_s, fn, what)
    except storage.StorageTimeout as e:
      self._stuck = storage.StorageTimeout(f"{e} (train.save_timeout_s); is the bucket "
                                           "reachable from this host?")
      raise self._stuck from None

  def restore(self, step: int, like):
    """Restores ``(state, iterator_state)`` at ``step``.

    Args:
      like: a state with the target structure, shapes, dtypes and shardings
        (e.g. the freshly initialised, replicated state).
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=IteratorRestore()))
    return restored.state, restored.data

  def saved_config(self, step: int) -> dict:
    """The config saved with the checkpoint of ``step`` (as JSON)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def restore_params(self, step: int, ema: bool = True):
    """The (EMA) parameters saved at ``step``, on this process's first device.

    Needs no template and works whatever device or process count saved them
    (a pod run read on one host): the target is built from the checkpoint's
    own metadata, placed on one local device.
    """
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.manager.directory) / str(step) / "state")
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device)
        if hasattr(m, "shape") and hasattr(m, "dtype") else m, dict(tree))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored.state["ema_params" if ema else "params"]

  def wait(self):
    """Blocks until pending async saves are written (at most ``timeout_s``)."""
    self._bounded(self.manager.wait_until_finished,
                  f"writing the checkpoints in {self.manager.directory}")

  def close(self):
    if self._stuck is None:   # else closing would wait for the stuck write
      self.manager.close()
