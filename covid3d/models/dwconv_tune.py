"""The depthwise backend that ``impl='auto'`` uses: measured once per device and shape.

``choose`` times each candidate backend (one jitted forward+backward call) on the
current device and returns the fastest one's name. The measurement is kept in
``dwconv_auto.json`` under the cache root (``covid3d.cachedir``), keyed by
``'<platform>|<device kind>|<input shape>|<kernel shape>|<dtype>|<candidates>'``,
so later traces and processes reuse it: that table is the only memory of a choice.

With several processes (a pod), process 0 decides, from its table or by measuring,
and the others receive the index of its choice through a one-value collective
(``_from_process_0``): every host compiles the same program whatever its own
table holds. Every process traces the same model, so every process joins each
collective.

``recorded`` lists the table's choices for this device, which a stage copies
into its ``config.json`` (``covid3d.stages.registry``). The tuner knows backends
only as the functions it is given (``covid3d.models.dwconv`` owns them and the
list of candidates).
"""
import logging
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from covid3d import cachedir, storage
from covid3d.timing import median_seconds

TABLE = "dwconv_auto.json"

Backend = Callable[[jax.Array, jax.Array], jax.Array]


def cache_key(x_shape: Sequence[int], k_shape: Sequence[int], dtype,
              candidates: Sequence[str]) -> str:
  """The table's key of a choice on the current device.

  The candidate list is part of the key: a choice made before a backend
  existed (or was eligible) is measured again, not reused.
  """
  return (f"{_device_prefix()}{tuple(int(s) for s in x_shape)}|"
          f"{tuple(int(s) for s in k_shape)}|{jnp.dtype(dtype).name}|{','.join(candidates)}")


def _device_prefix() -> str:
  dev = jax.devices()[0]
  return f"{dev.platform}|{dev.device_kind}|"


def time_impl(fn: Backend, x_shape, k_shape, dtype=jnp.float32, reps=3, grad=True) -> float:
  """Median seconds of one jitted call of ``fn(x, kernel)`` (forward, or forward+backward)."""
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape, dtype)
  kern = jax.random.normal(kk, k_shape, dtype)
  if grad:
    fn = jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b).astype(jnp.float32) ** 2), (0, 1))
  return median_seconds(jax.jit(fn), x, kern, reps=reps)


def read_table() -> dict:
  """``{cache key: {'best': name, 'seconds': {name: s}, ['errors': {name: message}]}}``;
  empty when the file is missing or unreadable."""
  path = storage.as_path(cachedir.path(TABLE))
  try:
    return storage.read_json(path) if path.exists() else {}
  except (OSError, ValueError):
    return {}


def _measure(backends: Mapping[str, Backend], x_shape, k_shape, dtype) -> dict:
  """A table entry: every backend's time and the fastest one's name."""
  times, errors = {}, {}
  with jax.ensure_compile_time_eval():
    for name, fn in backends.items():
      try:
        times[name] = time_impl(fn, x_shape, k_shape, dtype)
      except Exception as e:  # pylint: disable=broad-except
        if name != "pallas":
          raise
        # A Pallas kernel this device's compiler rejects (e.g. Mosaic TPU's
        # layout limits) is not a candidate; the others still are.
        errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  entry = {"best": min(times, key=times.get), "seconds": times}
  if errors:
    entry["errors"] = errors
  return entry


def _choose_here(backends: Mapping[str, Backend], key: str, x_shape, k_shape, dtype) -> str:
  """This process's choice: from the table under the cache root, else measured and added."""
  table = read_table()
  if key not in table:
    table[key] = _measure(backends, x_shape, k_shape, dtype)
    try:
      storage.write_json(cachedir.path(TABLE), table, indent=1, sort_keys=True)
    except OSError as e:
      logging.warning("dwconv auto: cannot write %s (%s); each trace measures again",
                      cachedir.path(TABLE), e)
  return table[key]["best"]


def choose(backends: Mapping[str, Backend], x_shape: Sequence[int], k_shape: Sequence[int],
           dtype=jnp.float32) -> str:
  """The name of the fastest of ``backends`` for this shape, the same on every process.

  Args:
    backends: candidate name -> ``fn(x, kernel)``, all computing the same function.
    x_shape, k_shape: input ``(B, *spatial, C)`` and kernel ``(*k, 1, C)`` shapes.
    dtype: the input's dtype.
  """
  names = tuple(backends)
  key = cache_key(x_shape, k_shape, dtype, names)
  index = 0
  if jax.process_index() == 0:
    index = names.index(_choose_here(backends, key, tuple(x_shape), tuple(k_shape),
                                     jnp.dtype(dtype)))
  return names[_from_process_0(index)]


def _from_process_0(value: int) -> int:
  """Process 0's ``value`` on every process; callable while a model is traced.

  ``multihost_utils.broadcast_one_to_all`` would do, but it sets a mesh, which
  JAX refuses inside ``jax.jit``. This is the same sum over one value per
  process (process 0's ``value``, the others' 0), with its shardings given
  explicitly, run now rather than traced. The other processes wait in it while
  process 0 measures.
  """
  if jax.process_count() == 1:
    return value
  mesh = jax.sharding.Mesh(
      np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count()),
      ("processes", "local"))
  per_process, replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
                             for spec in (("processes",), ()))
  mine = np.array([value if jax.process_index() == 0 else 0], np.int32)   # one per process
  with jax.ensure_compile_time_eval():
    values = jax.make_array_from_process_local_data(per_process, mine)
    total = jax.jit(jnp.sum, out_shardings=replicated)(values)
    return int(np.asarray(total.addressable_data(0)))


def recorded(candidates: Sequence[str]) -> dict:
  """``{cache key: backend}`` of this process's table for the current device and
  ``candidates``: every choice ``choose`` would reuse here now."""
  head, tail = _device_prefix(), f"|{','.join(candidates)}"
  return {key: entry["best"] for key, entry in sorted(read_table().items())
          if key.startswith(head) and key.endswith(tail)}
