"""Optimiser, learning-rate schedule and parameter EMA from the ``train`` config."""
import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per update step from ``config.schedule``.

  'constant': ``learning_rate`` throughout (the challenge submissions).
  'cosine': linear warmup 0 -> ``learning_rate`` over ``warmup_steps``, then
  cosine decay to ``final_learning_rate`` at ``num_steps``.
  """
  if config.schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == "cosine":
    if config.warmup_steps >= config.num_steps:
      raise ValueError(f"train.warmup_steps ({config.warmup_steps}) must be "
                       f"below train.num_steps ({config.num_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps, decay_steps=config.num_steps,
        end_value=config.final_learning_rate)
  raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {config.schedule!r}")


def decayed(params):
  """True for the parameters the official ConvNeXt recipe decays: those of 2 or more axes.

  The 1-D ones (LayerNorm scales and biases, every bias, the layer-scale
  ``gamma``) are exempt, as timm's ``param_groups_weight_decay``.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (or Adam) with the config's schedule, after optional norm clipping.

  ``decay_1d=False`` exempts the 1-D parameters from the weight decay (``decayed``).
  """
  if config.optimizer not in ("adamw", "adam"):
    raise ValueError(f"train.optimizer must be 'adamw' or 'adam', got {config.optimizer!r}")
  weight_decay = config.weight_decay if config.optimizer == "adamw" else 0.0
  adamw = optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=weight_decay,
                      mask=None if config.decay_1d else decayed)
  if config.clip_norm < 0:
    raise ValueError(f"train.clip_norm must be >= 0, got {config.clip_norm}")
  if config.clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
  return adamw


def resolve_ema_decay(ema_decay: float | None, num_classes: int | None) -> float:
  """The EMA decay: the configured one, else 0.995 for 2 classes, 0.99 otherwise."""
  if ema_decay is None:
    return 0.995 if num_classes == 2 else 0.99
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {ema_decay}")
  return float(ema_decay)


def ema_update(ema_params, params, decay: float):
  """``decay * ema + (1 - decay) * params``, leaf by leaf."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
