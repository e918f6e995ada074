"""``train_and_evaluate``: the training loop every stage runs."""
import signal
import threading
import time
from typing import Any, Callable, Iterable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

from covid3d import storage
from covid3d.train import checkpoint, log, optim, steps
from covid3d.train.config import check_same_settings, compute_dtype, resolve_schedule
from covid3d.train.state import create_state
from covid3d.train.tasks import Task


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class StatefulIterator(Protocol):
  """Host batches (dicts of numpy arrays, this process's share of the global
  batch) whose position can be saved and restored as a JSON-able object."""

  def __next__(self) -> dict: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


def init_distributed(config: ml_collections.ConfigDict):
  """Calls ``jax.distributed.initialize`` if ``config.distributed.initialize``.

  Must run before anything touches the devices. Unset address fields are
  detected by JAX (TPU pods, SLURM); on CPU give all three (the CPU collectives
  across processes are gloo's, the default of the JAX covid3d requires: nothing
  to set). The timeouts are the ``*_s`` fields (``covid3d.train.config``).
  """
  d = config.distributed
  if d.initialize:
    jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id,
                               initialization_timeout=d.initialization_timeout_s,
                               heartbeat_timeout_seconds=d.heartbeat_timeout_s,
                               shutdown_timeout_seconds=d.shutdown_timeout_s)


def _compile_then_meet(train_step, state, batch, timeout_s: int, name: str):
  """Compiles the first step, then waits (``timeout_s``) until every process has too.

  The first run of a step sets up its collectives, and on CPU (gloo) that
  rendezvous gives up after a fixed 30 s: less than one host may lag behind
  another in restoring a checkpoint or compiling. Compiled ahead (``jax.jit``
  reuses it), the processes leave the barrier ready to run the step together.
  """
  if jax.process_count() == 1:
    return
  train_step.lower(state, batch).compile()
  # With ``processes`` given, Orbax waits on the coordination service's barrier
  # (which honours the timeout), not on a device collective.
  ocp_multihost.sync_global_processes(name, timeout=timeout_s,
                                      processes=set(range(jax.process_count())))


class _StopSignal:
  """Records SIGTERM / SIGINT so the loop can checkpoint and exit cleanly."""

  def __init__(self):
    self.signum = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C does not wait for the checkpoint
    self.signum = signum

  def requested(self) -> bool:
    """Whether any process got a signal (agreed across processes)."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _pad(batch: dict, size: int) -> dict:
  """Pads a host eval batch to ``size`` examples, with ``valid`` False on padding."""
  n = len(next(iter(batch.values())))
  if n > size:
    raise ValueError(f"an eval batch has {n} examples on this host, more than "
                     f"train.eval_batch_size / process_count = {size}")
  batch = dict(batch)
  batch["valid"] = np.asarray(batch.get("valid", np.ones(n, bool)), bool)
  return {k: np.concatenate([np.asarray(v), np.zeros((size - n,) + np.shape(v)[1:],
                                                     np.asarray(v).dtype)])
          for k, v in batch.items()}


def evaluate(eval_step, params, batches: Iterable[dict], task: Task, host_batch: int,
             mesh) -> dict:
  """Runs ``eval_step`` over all ``batches`` and summarises the results.

  Sums are added over batches; per-example arrays (``'examples'``, see
  ``steps``) are gathered from every process, concatenated, and their padded
  rows dropped.
  """
  totals, gathered = None, []
  for batch in batches:
    sums, examples = eval_step(params, steps.shard_batch(_pad(batch, host_batch), mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if examples:
      gathered.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(examples,
                                                                                 tiled=True)))
  if totals is None:
    raise ValueError("the evaluation data yielded no batch")
  totals = jax.device_get(totals)
  if gathered:
    keep = np.concatenate([g["valid"] for g in gathered]).astype(bool)
    totals["examples"] = {k: np.concatenate([g[k] for g in gathered])[keep]
                          for k in gathered[0] if k != "valid"}
  return task.summarize(totals)


def itstime(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log, evaluate, checkpoint) is due after ``step``.

  Every ``every`` steps and always at the last step ``total``; ``every`` 0 means
  only at the last step.
  """
  return step == total or (every > 0 and step % every == 0)


def _per_host(global_size: int, name: str, mesh) -> int:
  per_host, rem = divmod(global_size, jax.process_count())
  if rem or per_host % mesh.local_mesh.size:
    raise ValueError(f"train.{name}={global_size} must divide by the device count "
                     f"({mesh.size} on {jax.process_count()} processes)")
  return per_host


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, model, params,
                       train_iter: StatefulIterator, task: Task, *,
                       eval_batches: Callable[[], Iterable[dict]] | None = None,
                       augment_fn: steps.AugmentFn | None = None,
                       apply_fn: steps.ApplyFn | None = None,
                       stage_config: ml_collections.ConfigDict | None = None,
                       num_records: int | None = None) -> dict:
  """Trains ``model`` from ``params`` for ``config.num_steps`` updates, resuming if possible.

  On start the latest checkpoint in ``<workdir>/checkpoints`` (if any) is
  restored with the iterator's position, so a killed run restarted with the
  same arguments ends exactly like an uninterrupted one.

  Args:
    config: the ``train`` block (``covid3d.train.config.default_config``).
    workdir: str, local or gs:// directory for checkpoints, ``metrics.jsonl``
      and ``tensorboard/``.
    model: a flax module called as ``model.apply({'params': p}, x,
      deterministic=..., rngs=...)``; ignored if ``apply_fn`` is given.
    params: float32 initial parameter tree (used when nothing is resumed).
    train_iter: endless iterator of host batches with get_state/set_state;
      each batch holds ``config.batch_size / process_count`` examples and an
      'image' entry ``(b, D, H, W, C)``.
    task: losses and metrics (``tasks.classification_task`` ...).
    eval_batches: returns a fresh iterable over the validation set's host
      batches (at most ``eval_batch_size / process_count`` examples each; the
      same number of batches on every process). None: no evaluation.
    augment_fn: per-example augmentation run in the step (None: none).
    apply_fn: overrides ``model`` (see ``steps``).
    stage_config: the whole resolved config, saved with each checkpoint
      (default ``config``).
    num_records: the number of training records (global), for a schedule in
      epochs (``config.num_epochs``; ``train.config.resolve_schedule``): the
      resolved steps are logged and written to ``<workdir>/schedule.json``.

  Returns:
    Dict: 'state' (the final TrainState), 'step', 'best_step' (None without
    evaluation), 'eval' (the last evaluation's metrics or None),
    'nonfinite_total'.

  Raises:
    NonFiniteError: after ``config.max_nonfinite_in_a_row`` consecutive
      non-finite steps (the last checkpoint is left as it was).
    SystemExit: with code 128 + signal number after SIGTERM/SIGINT, once a
      checkpoint of the current step is written.
  """
  process0 = jax.process_index() == 0
  saved_config = stage_config if stage_config is not None else config
  config, schedule = resolve_schedule(config, num_records)
  if schedule is not None:
    logging.info("schedule: %g epochs of %d steps (%d training records / global batch %d) = "
                 "%d steps, evaluation every %d", schedule["num_epochs"],
                 schedule["steps_per_epoch"], num_records, config.batch_size, config.num_steps,
                 config.eval_every)
    if process0:
      storage.write_json(epath.Path(workdir) / "schedule.json", schedule, indent=1)
  mesh = steps.make_mesh()
  host_batch = _per_host(config.batch_size, "batch_size", mesh)
  if (config.batch_size // mesh.size) % config.micro_batches:
    raise ValueError(f"train.batch_size / devices = {config.batch_size // mesh.size} does not "
                     f"split into train.micro_batches={config.micro_batches}")
  host_eval_batch = _per_host(config.eval_batch_size, "eval_batch_size", mesh)
  dtype = compute_dtype(config.compute_dtype)
  apply_fn = apply_fn or steps.flax_apply_fn(model)

  tx = optim.make_optimizer(config)
  state = steps.replicate(create_state(params, tx, config.seed), mesh)
  ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"),
                                 config.keep_checkpoints, config.best_metric,
                                 timeout_s=config.save_timeout_s,
                                 min_gain=config.best_min_gain, ties=config.best_ties)
  latest = ckpt.latest_step()
  if latest is not None:
    # A checkpoint of other settings is not this run's to resume.
    check_same_settings(ckpt.saved_config(latest), saved_config,
                                    f"{workdir} (checkpoint of step {latest})")
    state, iterator_state = ckpt.restore(latest, state)
    train_iter.set_state(iterator_state)
    logging.info("resumed from step %d in %s", latest, workdir)

  train_step = steps.make_train_step(
      apply_fn, task.loss_fn, tx, mesh,
      ema_decay=optim.resolve_ema_decay(config.ema_decay, task.num_classes),
      micro_batches=config.micro_batches, augment_fn=augment_fn,
      compute_dtype=dtype, schedule=optim.make_schedule(config))
  eval_step = steps.make_eval_step(apply_fn, task.eval_fn, mesh, compute_dtype=dtype)
  logger = log.MetricLogger(workdir, enabled=process0)
  step = first_step = int(jax.device_get(state.step))
  last_saved = step
  bar = log.progress_bar(config.num_steps, step, enabled=process0 and config.progress_bar)
  stop = _StopSignal()
  window, window_start, last_eval = [], time.perf_counter(), None
  try:
    while step < config.num_steps:
      try:
        batch = next(train_iter)
      except StopIteration:
        raise ValueError(f"the training data ran out at step {step}; train_iter must "
                         "repeat the data (epochs) for as long as num_steps needs") from None
      size = len(batch["image"])
      if size != host_batch:
        raise ValueError(f"a training batch has {size} examples on this host; expected "
                         f"train.batch_size / process_count = {host_batch}")
      batch = steps.shard_batch(batch, mesh)
      if step == first_step:
        _compile_then_meet(train_step, state, batch, config.distributed.first_step_timeout_s,
                           f"covid3d_first_step:{workdir}:{step}")
      state, metrics = train_step(state, batch)
      metrics = jax.device_get(metrics)
      step = int(metrics["step"])
      if not metrics["finite"]:
        logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        step, metrics["nonfinite_run"])
        if metrics["nonfinite_run"] >= config.max_nonfinite_in_a_row:
          raise NonFiniteError(
              f'stopping: {int(metrics["nonfinite_run"])} consecutive steps had a non-finite '
              f'loss or gradient (train.max_nonfinite_in_a_row='
              f'{config.max_nonfinite_in_a_row}); the parameters are those of step {step}, '
              f'the latest checkpoint is step {ckpt.latest_step()} in {workdir}')
      else:
        window.append(metrics)
        bar.update(1)
        if itstime(step, config.log_every, config.num_steps):
          seconds = time.perf_counter() - window_start
          summary = {k: float(np.mean([m[k] for m in window]))
                     for k in ("loss", "grad_norm", "learning_rate")}
          summary["volumes_per_second"] = len(window) * config.batch_size / seconds
          summary["nonfinite_total"] = int(metrics["nonfinite_total"])
          logger.write(step, "train", summary)
          bar.set_postfix(loss=f"{summary['loss']:.4f}",
                          vol_s=f"{summary['volumes_per_second']:.2f}")
          window, window_start = [], time.perf_counter()
        evaluated = None
        if eval_batches is not None and itstime(step, config.eval_every, config.num_steps):
          evaluated = last_eval = evaluate(eval_step, state.ema_params, eval_batches(), task,
                                           host_eval_batch, mesh)
          if config.best_metric not in evaluated:
            raise ValueError(f"train.best_metric={config.best_metric!r} is not one of the "
                             f"evaluation metrics {sorted(evaluated)}")
          if np.isnan(evaluated[config.best_metric]):
            logging.warning("step %d: train.best_metric %s is NaN (e.g. an AUC with one class "
                            "absent); this checkpoint cannot be the best", step, config.best_metric)
          logger.write(step, "eval", evaluated)
          logging.info("step %d eval (EMA): %s", step, evaluated)
        if evaluated is not None or itstime(step, config.checkpoint_every, config.num_steps):
          logger.flush()  # a checkpoint's rows reach a bucket before the checkpoint does
          ckpt.save(step, state, train_iter.get_state(), saved_config, evaluated)
          last_saved = step
      if stop.requested():
        if step != last_saved:
          logger.flush()
          ckpt.save(step, state, train_iter.get_state(), saved_config)
        ckpt.wait()
        signum = stop.signum or signal.SIGTERM
        logging.warning("signal %d: checkpoint of step %d written, exiting", signum, step)
        raise SystemExit(128 + signum)
  finally:
    ckpt.wait()
    stop.restore()
    bar.close()
    logger.close()
  result = {"state": state, "step": step, "best_step": ckpt.best_step(), "eval": last_eval,
            "nonfinite_total": int(jax.device_get(state.nonfinite_total))}
  ckpt.close()
  return result
