"""Training engine: train state, optimiser + EMA, sharded steps, checkpoints, logging, loop.

Public names: ``default_config``, ``TrainState``, ``create_state``,
``make_optimizer``, ``make_schedule``, ``make_train_step``, ``make_eval_step``,
``make_mesh``, ``shard_batch``, ``replicate``, ``Checkpointer``, ``MetricLogger``,
``Task``, ``classification_task``, ``segmentation_task``, ``train_and_evaluate``,
``flax_apply_fn``, ``itstime``, ``init_distributed``, ``NonFiniteError``.
"""
from covid3d.train.checkpoint import Checkpointer
from covid3d.train.config import default_config
from covid3d.train.log import MetricLogger
from covid3d.train.loop import NonFiniteError, init_distributed, itstime, train_and_evaluate
from covid3d.train.optim import make_optimizer, make_schedule, resolve_ema_decay
from covid3d.train.state import TrainState, create_state
from covid3d.train.steps import (flax_apply_fn, make_eval_step, make_mesh, make_train_step,
                                  replicate, shard_batch)
from covid3d.train.tasks import Task, classification_task, segmentation_task
