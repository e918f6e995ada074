"""The train state: everything a bit-exact resume needs, as one pytree."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Training state; every field is an array (replicated over devices).

  Attributes:
    step: int32 scalar, optimiser updates applied so far.
    params: float32 parameter tree.
    ema_params: float32 tree like ``params``, the exponential moving average
      that is evaluated, kept as best and used for predictions.
    opt_state: the optax state of ``params``.
    rng: uint32 (2,) raw base key; the key of a train batch is
      ``fold_in(rng, step + nonfinite_total)`` (the number of batches drawn),
      so randomness depends only on the seed and the position in the run.
    nonfinite_total: int32 scalar, steps skipped for a non-finite loss/grad.
    nonfinite_run: int32 scalar, consecutive skipped steps up to now.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_run: jax.Array

  @property
  def batches_seen(self) -> jax.Array:
    """int32 scalar: train batches consumed (applied + skipped)."""
    return self.step + self.nonfinite_total


def create_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state at step 0 whose EMA starts equal to ``params``.

  Args:
    params: float32 parameter tree (e.g. ``variables['params']``).
    tx: the optimiser.
    seed: int, seeds ``rng``.
  """
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=jax.random.PRNGKey(seed),
      nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_run=jnp.zeros((), jnp.int32))
