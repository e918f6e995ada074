"""Sharded train and eval steps.

Per-device step functions reduce with ``lax.pmean``/``lax.psum`` over the mesh
axis ``'data'`` and run through ``jax.shard_map`` under ``jax.jit`` over a
``Mesh`` of all devices: the pmap programming model, written the way JAX
recommends now (``jax.pmap`` itself lowers to this since JAX 0.10). The train
state is replicated and donated; batches are sharded on their leading axis.

Contracts of the functions passed in:

* ``apply_fn(params, x, deterministic, rngs) -> outputs``: the model, e.g.
  ``lambda p, x, d, r: model.apply({'params': p}, x, deterministic=d, rngs=r)``;
  ``x`` is ``(B, D, H, W, C)``; outputs is an array or a dict of arrays with a
  leading batch axis.
* ``loss_fn(outputs, batch) -> (loss, weight)``: ``loss`` the float32 weighted
  mean over the examples given, ``weight`` its normaliser (the number of
  counted examples, or the sum of their class weights), which must not depend
  on the parameters. The step differentiates ``loss * weight`` and divides the
  summed gradients by the summed weights of all micro-batches and devices, so
  an update equals the one computed on the whole global batch at once, for any
  device count and any number of micro-batches. A micro-batch with weight 0
  must still return a finite loss.
* ``augment_fn(key, example) -> example``: one example (a dict without the
  batch axis) and its own key; run on device in the same jitted program,
  each device over its own examples one at a time (``lax.map``).
* ``eval_fn(outputs, batch) -> dict of arrays``: per-batch SUMS (e.g. a
  confusion matrix), added over devices with ``psum``; padded examples carry
  ``batch['valid'] == False`` and must not count. The entry ``'examples'``,
  if present, is instead a dict of per-example arrays (leading batch axis,
  e.g. scores for a ROC AUC), gathered rather than summed; padded examples
  are dropped before ``summarize`` sees them.

Randomness: a train batch's key is ``fold_in(state.rng, batches_seen)``; the
example with global index i gets ``fold_in(batch_key, i)``, split into its
augmentation key and its drop-path key. The model runs vmapped over single
examples so each example's drop path uses its own key. Hence results depend
only on the seed, the step and the global batch, not on the device count or
the micro-batch split.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from covid3d.train import optim
from covid3d.train.state import TrainState

AXIS = "data"
ApplyFn = Callable[[Any, jax.Array, bool, Any], Any]
LossFn = Callable[[Any, dict], tuple[jax.Array, jax.Array]]
AugmentFn = Callable[[jax.Array, dict], dict]
EvalFn = Callable[[Any, dict], dict]


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices, all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a host tree (identical on every process) replicated on ``mesh``."""
  sharding = NamedSharding(mesh, P())

  def put(leaf):
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

  return jax.tree.map(put, tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local batch (this process's slice of the global batch) -> global arrays.

  Args:
    batch: dict of numpy arrays with a leading axis of
      ``global_batch / process_count`` examples (divisible by the local
      device count).
  """
  sharding = NamedSharding(mesh, P(AXIS))
  local_devices = mesh.local_mesh.size
  for name, value in batch.items():
    if np.shape(value)[0] % local_devices:
      raise ValueError(f"batch['{name}'] has {np.shape(value)[0]} examples on this host, "
                       f"not divisible by its {local_devices} devices")
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def flax_apply_fn(model, mean: float = 0.0, std: float = 1.0) -> ApplyFn:
  """``apply_fn`` of a flax module whose only collection is 'params'.

  Inputs are normalised on device as ``(x - mean) / std`` first (the data's
  intensity statistics; the defaults leave them as they are).
  """
  def apply_fn(params, x, deterministic, rngs):
    return model.apply({"params": params}, (x - mean) / std, deterministic=deterministic,
                       rngs=rngs)
  return apply_fn


def _model_forward(apply_fn: ApplyFn, params, x, keys):
  """Training forward pass, vmapped over single examples with their own keys."""
  def one(xi, key):
    out = apply_fn(params, xi[None], False, {"dropout": key})
    return jax.tree.map(lambda o: o[0], out)
  return jax.vmap(one)(x, keys)


def _cast(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _example_keys(state: TrainState, index: jax.Array) -> jax.Array:
  """``(n, 2, 2)``: [augmentation key, drop-path key] of the examples at global ``index``."""
  batch_key = jax.random.fold_in(state.rng, state.batches_seen)
  return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(batch_key, i)))(index)


def _float32_volumes(batch: dict, input_key: str) -> dict:
  """The batch with its volumes as cached (float16 or uint8) as float32 in [0, 1], on the devices.

  Converting here rather than on the host divides the bytes each volume costs
  the host pipeline and the host-to-device copy by 2 (float16; the conversion
  is exact) or 4 (uint8 v -> v / 255, as ``schema.decode_volume`` on the
  host). uint8 volumes are ``input_key`` and ``<input_key>_large`` (the crop
  source); other uint8 arrays (masks) stay.
  """
  volumes = (input_key, f"{input_key}_large")

  def convert(k, v):
    if v.dtype == jnp.float16:
      return v.astype(jnp.float32)
    if v.dtype == jnp.uint8 and k in volumes:
      return v.astype(jnp.float32) / jnp.float32(255)
    return v
  return {k: convert(k, v) for k, v in batch.items()}


def make_train_step(apply_fn: ApplyFn, loss_fn: LossFn, tx: optax.GradientTransformation,
                    mesh: Mesh, *, ema_decay: float, micro_batches: int = 1,
                    augment_fn: AugmentFn | None = None, compute_dtype=jnp.float32,
                    schedule: optax.Schedule | None = None, input_key: str = "image"):
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  Args:
    apply_fn, loss_fn, augment_fn: see the module docstring.
    tx: the optimiser (``optim.make_optimizer``).
    mesh: the device mesh (``make_mesh``).
    ema_decay: float, EMA decay per applied update.
    micro_batches: int, gradient-accumulation micro-batches per device.
    compute_dtype: dtype of the forward/backward pass (float32 or bfloat16);
      gradients, optimiser and EMA stay float32.
    schedule: optional learning-rate schedule, only for the metrics.
    input_key: the batch entry fed to the model, ``(B, D, H, W, C)`` float32
      (volumes as cached become float32 first: float16 arrays of the batch,
      and ``input_key``/``<input_key>_large`` when uint8, see ``_float32_volumes``).

  Returns:
    A jitted function. ``state`` (replicated, donated) and ``batch`` (dict of
    global arrays sharded on axis 0, see ``shard_batch``). ``metrics`` is a
    dict of replicated scalars: 'loss' (global weighted mean), 'weight',
    'grad_norm' (before clipping), 'finite' (bool: the update was applied),
    'learning_rate', and the state's 'step', 'nonfinite_total',
    'nonfinite_run' after the step. A non-finite loss or gradient leaves
    params, EMA, optimiser state and step unchanged and increments the
    non-finite counters.
  """
  def per_device(state: TrainState, batch: dict):
    local = batch[input_key].shape[0]
    if local % micro_batches:
      raise ValueError(f"{local} examples per device do not split into "
                       f"train.micro_batches={micro_batches}")
    keys = _example_keys(state, lax.axis_index(AXIS) * local + jnp.arange(local))

    def objective(params, micro, drop_keys):
      x = micro[input_key].astype(compute_dtype)
      outputs = _model_forward(apply_fn, _cast(params, compute_dtype), x, drop_keys)
      loss, weight = loss_fn(_cast(outputs, jnp.float32), micro)
      weight = lax.stop_gradient(jnp.asarray(weight, jnp.float32))
      return loss * weight, weight

    # Differentiate a device-varying copy of the replicated params: the
    # gradients stay per-device (pmap style) until the explicit pmean below;
    # w.r.t. the replicated params shard_map would psum them implicitly.
    local_params = lax.pcast(state.params, AXIS, to="varying")

    def accumulate(carry, xs):
      grads, loss_sum, weight_sum = carry
      micro, drop_keys = xs
      (lsum, weight), g = jax.value_and_grad(objective, has_aux=True)(
          local_params, micro, drop_keys)
      return (jax.tree.map(jnp.add, grads, g), loss_sum + lsum, weight_sum + weight), None

    split = lambda a: a.reshape((micro_batches, local // micro_batches) + a.shape[1:])
    # The carry varies over devices (it depends on each device's data).
    zeros = lax.pcast((jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(())),
                      AXIS, to="varying")
    (grads, loss_sum, weight_sum), _ = lax.scan(
        accumulate, zeros,
        (jax.tree.map(split, batch), split(keys[:, 1])))
    # pmean of numerator and denominator: the ratio is the global weighted mean.
    weight = lax.pmean(weight_sum, AXIS)
    denom = jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g: lax.pmean(g, AXIS) / denom, grads)
    loss = lax.pmean(loss_sum, AXIS) / denom
    finite = jnp.isfinite(loss) & _all_finite(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, ema_decay)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32),
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_total=state.nonfinite_total + skipped,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
    lr = schedule(state.step) if schedule is not None else jnp.nan
    metrics = {"loss": loss, "weight": weight * lax.axis_size(AXIS),
               "grad_norm": optax.tree.norm(grads), "finite": finite,
               "learning_rate": jnp.asarray(lr, jnp.float32), "step": new_state.step,
               "nonfinite_total": new_state.nonfinite_total,
               "nonfinite_run": new_state.nonfinite_run}
    return new_state, metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                          out_specs=(P(), P()))
  if augment_fn is None:
    return jax.jit(lambda state, batch: sharded(state, _float32_volumes(batch, input_key)),
                   donate_argnums=0)
  # Each device augments its own examples one after the other: each example
  # skips the random steps it did not draw, where vmap would turn every
  # lax.cond into both branches. No collectives and no gradients here, so the
  # varying-axes check (which rejects a cond with a constant branch) is off.
  augment_local = jax.shard_map(
      lambda keys, batch: lax.map(lambda args: augment_fn(*args), (keys, batch)),
      mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS), check_vma=False)

  def step(state, batch):
    batch = _float32_volumes(batch, input_key)
    keys = _example_keys(state, jnp.arange(batch[input_key].shape[0]))
    return sharded(state, augment_local(keys[:, 0], batch))

  return jax.jit(step, donate_argnums=0)


def make_eval_step(apply_fn: ApplyFn, eval_fn: EvalFn, mesh: Mesh, *,
                   compute_dtype=jnp.float32, input_key: str = "image"):
  """Builds ``eval_step(params, batch) -> (sums, examples)``.

  ``sums``: ``eval_fn``'s sums over the global batch (replicated). ``examples``:
  its ``'examples'`` entry (per-example arrays, sharded like the batch) with the
  batch's ``valid`` flags, or an empty dict. ``params`` (replicated; the EMA
  parameters in the loop) are not donated; the model runs deterministic.
  """
  def per_device(params, batch):
    outputs = apply_fn(_cast(params, compute_dtype),
                       batch[input_key].astype(compute_dtype), True, None)
    sums = dict(eval_fn(_cast(outputs, jnp.float32), batch))
    examples = sums.pop("examples", {})
    if examples:
      examples = dict(examples, valid=batch["valid"])
    return jax.tree.map(lambda s: lax.psum(s, AXIS), sums), examples

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                          out_specs=(P(), P(AXIS)))
  return jax.jit(sharded)
