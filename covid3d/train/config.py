"""The ``train`` block of a stage config: every field of the training engine."""
import json

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The jnp dtype of ``train.compute_dtype`` (float32 or bfloat16)."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
  return COMPUTE_DTYPES[name]


def listed(value) -> tuple[str, ...]:
  """The words of a comma-separated config string ('' -> (); a list as saved by older runs)."""
  if isinstance(value, (list, tuple)):
    return tuple(str(v) for v in value)
  return tuple(w.strip() for w in str(value or "").split(",") if w.strip())


def default_config() -> ml_collections.ConfigDict:
  """Returns the training defaults (the challenge fine-tuning recipe), each field documented."""
  c = ml_collections.ConfigDict()
  c.seed = 0                          # seeds the train state's key (augmentation, drop path)
  c.num_steps = 1000                  # optimiser updates to run (skipped non-finite steps
                                      # excluded); replaced by the epochs when num_epochs is set
  c.num_epochs = 0.0                  # > 0: the run's length in passes over the training
                                      # records, resolved when it starts (resolve_schedule) from
                                      # their count and the global batch, so an epoch is an
                                      # epoch on any number of hosts and any batch size;
                                      # 0: num_steps as given
  c.eval_every_epochs = 0.0           # > 0 (with num_epochs): evaluate and checkpoint every this
                                      # many epochs, replacing eval_every and checkpoint_every
  c.shuffle = True                    # draw each epoch's training order afresh (train.seed);
                                      # False: every epoch reads the records in the stage's
                                      # order (the authors' segmia and multitask loaders)
  c.batch_size = 4                    # GLOBAL examples per update, summed over all devices and
                                      # hosts; must divide by the device count times
                                      # micro_batches
  c.micro_batches = 1                 # gradient accumulation: each device splits its share of
                                      # the batch into this many micro-batches, run one after
                                      # another
  c.eval_batch_size = 4               # global batch of the evaluation step; partial batches are
                                      # padded and masked
  c.optimizer = "adamw"               # 'adamw' or 'adam' (Adam = AdamW with no weight decay)
  c.learning_rate = 5e-5              # peak learning rate (the submissions')
  c.weight_decay = 1e-8               # decoupled AdamW weight decay (the submissions')
  c.decay_1d = True                   # decay the 1-D parameters too (LayerNorm scales and
                                      # biases, biases, layer-scale gamma), as the submissions'
                                      # AdamW over all parameters; False exempts them, as the
                                      # official ConvNeXt recipe (the pretrain2d stage)
  c.b1 = 0.9                          # Adam's first-moment decay
  c.b2 = 0.999                        # Adam's second-moment decay
  c.eps = 1e-8                        # Adam's epsilon
  c.schedule = "constant"             # 'constant' or 'cosine' (linear warmup from 0 to
                                      # learning_rate over warmup_steps, then cosine decay to
                                      # final_learning_rate at num_steps)
  c.warmup_steps = 0                  # warmup length of the 'cosine' schedule
  c.final_learning_rate = 1e-6        # end of the cosine decay
  c.clip_norm = 0.0                   # clip gradients to this global L2 norm; 0 disables
  c.ema_decay = placeholder(float)    # parameter EMA decay per update; None picks 0.99 for 4
                                      # classes and 0.995 for 2 (optim.resolve_ema_decay)
  c.compute_dtype = "float32"         # 'float32' or 'bfloat16': dtype of the forward/backward
                                      # pass; master parameters, optimiser state and EMA stay
                                      # float32
  c.log_every = 10                    # steps between metric records (JSON lines, TensorBoard)
  c.eval_every = 100                  # steps between evaluations with the EMA parameters
                                      # (0: only at the end)
  c.checkpoint_every = 100            # steps between checkpoints (also at every evaluation and
                                      # at the end)
  c.keep_checkpoints = 2              # latest checkpoints kept (the best one is kept too)
  c.save_timeout_s = 600.0            # seconds a checkpoint save may wait for its storage (a
                                      # bucket that stopped answering) before the stage stops
                                      # with an error that says so, also after a SIGTERM
  c.best_metric = "macro_f1"          # the evaluation metric (higher is better) that chooses the
                                      # best checkpoint, the one handed to the next stage:
                                      # 'macro_f1' for classification, 'dice' for segmentation,
                                      # 'auc' (STOIC ROC AUC) for multitask; any metric the
                                      # task's evaluation reports; the checkpoints record it
  c.best_min_gain = 1e-4              # a later evaluation replaces the best checkpoint only if
                                      # its best_metric is higher by more than this (the
                                      # authors' fine-tuning; their pretrainings: 0, strictly
                                      # higher); equal maxima keep the earliest
  c.best_ties = "earliest"            # 'earliest' (the rule above, the authors') or 'latest':
                                      # an evaluation that equals the best replaces it (covid3d's
                                      # earlier rule; best_min_gain unused)
  c.max_nonfinite_in_a_row = 10       # stop after this many consecutive steps with a non-finite
                                      # loss or gradient (each leaves the state unchanged)
  c.progress_bar = True               # a tqdm bar on process 0
  c.distributed = ml_collections.ConfigDict()  # jax.distributed.initialize's arguments
  c.distributed.initialize = False    # True on multi-host TPU/GPU, where the fields below may
                                      # stay None to be detected
  c.distributed.coordinator_address = placeholder(str)  # 'host:port'
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)
  c.distributed.initialization_timeout_s = 600  # seconds the processes wait to reach the
                                      # coordinator at start
  c.distributed.first_step_timeout_s = 1800  # seconds the processes wait for each other before
                                      # the first training step, each with the step compiled (a
                                      # host restoring or compiling slower than the others; the
                                      # CPU collectives' own rendezvous gives up after a fixed 30 s)
  c.distributed.heartbeat_timeout_s = 60  # seconds without a process's heartbeat before it is
                                      # declared lost and JAX ends the others
  c.distributed.shutdown_timeout_s = 60  # seconds a process waits at exit for the others to exit
  return c


def resolve_schedule(config: ml_collections.ConfigDict, num_records: int | None):
  """``(config, schedule)``: a copy of the train block with its step counts from the epochs.

  ``schedule`` (a dict, for the logs and the workdir) says how they were
  resolved: steps per epoch = ``num_records // batch_size`` (at least 1).
  Without ``num_epochs`` the config is returned as it is, ``schedule`` None.

  Raises:
    ValueError: ``num_epochs`` set but the number of records unknown.
  """
  if not config.num_epochs:
    return config, None
  if not num_records:
    raise ValueError("train.num_epochs is set, but this stage did not say how many training "
                     "records it has; give train.num_steps instead")
  per_epoch = max(1, num_records // config.batch_size)
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.num_steps = max(1, round(config.num_epochs * per_epoch))
  if config.eval_every_epochs:
    resolved.eval_every = max(1, round(config.eval_every_epochs * per_epoch))
    resolved.checkpoint_every = resolved.eval_every
  schedule = {"num_epochs": config.num_epochs, "training_records": num_records,
              "global_batch": config.batch_size, "steps_per_epoch": per_epoch,
              "num_steps": resolved.num_steps, "eval_every": resolved.eval_every}
  return resolved, schedule


# Fields that do not change what a stage computes: a rerun may change them.
# dwconv_auto is not a setting: the record of what dwconv_impl='auto' chose.
NEUTRAL_FIELDS = ("cache_dir", "dwconv_auto", "data.workers", "data.loader_threads",
                  "train.log_every", "train.progress_bar", "train.keep_checkpoints",
                  "train.save_timeout_s", "train.distributed",
                  "pretrain2d.prefetch", "pretrain2d.loader_workers")


class SettingsChanged(ValueError):
  """A workdir holds a run (or a checkpoint) made with other settings."""


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def changed_fields(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for each field of ``config`` that changes what the stage computes."""
  old = _flatten(stored)
  new = _flatten(json.loads(config.to_json_best_effort()))
  neutral = lambda k: any(k == f or k.startswith(f + ".") for f in NEUTRAL_FIELDS)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
          for k in sorted(set(old) | set(new)) if not neutral(k) and old.get(k) != new.get(k)]


def check_same_settings(stored: dict, config: ml_collections.ConfigDict, where) -> None:
  """Raises SettingsChanged (one line naming the fields) unless ``config`` matches ``stored``."""
  changed = changed_fields(stored, config)
  if changed:
    raise SettingsChanged(
        f"{where} holds a run with other settings ({'; '.join(changed[:6])}"
        f"{'; ...' if len(changed) > 6 else ''}): use another --workdir, or --overwrite to "
        "delete that run and start afresh")
