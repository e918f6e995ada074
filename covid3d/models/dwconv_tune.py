"""The depthwise backend that ``impl='auto'`` uses: measured once per device and shape.

``choose`` times the candidate backends (a jitted forward+backward call) on the
current device and returns the fastest one's name. The timing is bounded, since
a slow backend's single call can take minutes at a large shape (XLA's grouped
3-D convolution on a CPU: 9 s at 14^3 x 384 channels, and it grows with the
voxels): a first round times every backend at a small shape of the same
kernel (`probe_shapes`), where a slow one costs little; the second round, at
the shape itself, times the survivors fastest first; in either round a backend
whose first call is more than ``PROBE_SLOWER`` (first round) or ``SLOWER`` times
the best so far is abandoned.
One log line per shape (logger ``covid3d.models.dwconv_tune``, INFO) says the
backend chosen, the others' fate and the seconds the tuning took; the table
entry keeps the same. The measurement is kept in
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
import math
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from covid3d import cachedir, storage
from covid3d.timing import median_seconds

TABLE = "dwconv_auto.json"
SLOWER = 2.0          # a backend this many times slower than the best so far is abandoned ...
PROBE_SLOWER = 4.0    # ... in the first round (few channels favour fft over shift): this many
PROBE_EDGE = 16       # the first round's spatial edge (voxels) ...
PROBE_CHANNELS = 32   # ... and channels (`probe_shapes`)
MEASURE_S = 1.0       # after its first call, a backend gets as many more (1-3) as fit in this
# The order of the first round where a platform's costs are known (the rest follow): on a
# CPU XLA's grouped 3-D convolution is a generic loop, 100x slower than fft (docs/benchmarks.md).
CHEAPEST_FIRST = {"cpu": ("fft", "shift", "xla")}

log = logging.getLogger(__name__)

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


def _compiled(fn: Backend, x_shape, k_shape, dtype, grad=True):
  """``(compiled, x, kernel)``: the jitted call (forward+backward if ``grad``) and its inputs."""
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, x_shape, dtype)
  kern = jax.random.normal(kk, k_shape, dtype)
  if grad:
    fn = jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b).astype(jnp.float32) ** 2), (0, 1))
  return jax.jit(fn).lower(x, kern).compile(), x, kern


def read_table() -> dict:
  """``{cache key: {'best': name, 'seconds': {name: s}, ['errors': {name: message}]}}``;
  empty when the file is missing or unreadable."""
  path = storage.as_path(cachedir.path(TABLE))
  try:
    return storage.read_json(path) if path.exists() else {}
  except (OSError, ValueError):
    return {}


def probe_shapes(x_shape, k_shape):
  """The shapes of the first, cheap round (`_measure`): batch 1, each spatial edge at most
  ``PROBE_EDGE``, at most ``PROBE_CHANNELS`` channels (the kernel's spatial size kept); None
  when the shape itself is not much larger (then one round at the shape is as cheap)."""
  channels = min(int(x_shape[-1]), PROBE_CHANNELS)
  probe = (1, *(min(int(s), PROBE_EDGE) for s in x_shape[1:-1]), channels)
  if 4 * math.prod(probe) > math.prod(x_shape):
    return None
  return probe, (*k_shape[:-1], channels)


def _race(backends: Mapping[str, Backend], order, x_shape, k_shape, dtype, slower: float):
  """Times ``backends`` in ``order`` at one shape, forward+backward.

  A backend whose first call takes more than ``slower`` times the best median so
  far is abandoned after that call (a running call cannot be cut short, so the
  cheap ones go first); the others get as many more calls (1-3) as fit in
  ``MEASURE_S``.

  Returns:
    ``(seconds, abandoned, errors)``: median seconds per timed backend; name ->
    how much slower its first call was; name -> the compiler's message (a
    ``pallas`` kernel this device's compiler rejects, e.g. Mosaic TPU's layout
    limits, is no candidate; the others' errors are raised).
  """
  times, abandoned, errors = {}, {}, {}
  for name in order:
    try:
      compiled, x, kern = _compiled(backends[name], x_shape, k_shape, dtype)
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(x, kern))
      first = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      if name != "pallas":
        raise
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      continue
    best = min(times.values(), default=math.inf)
    if first > slower * best:
      abandoned[name] = round(first / best, 1)
      continue
    reps = int(np.clip(MEASURE_S // max(first, 1e-9), 1, 3))
    times[name] = median_seconds(compiled, x, kern, reps=reps, warmup=0)
  return times, abandoned, errors


def _measure(backends: Mapping[str, Backend], x_shape, k_shape, dtype) -> dict:
  """A table entry: the fastest backend's name, the times behind it and the tuning's cost.

  Two rounds: at `probe_shapes` (where the slow backends cost little) every
  backend, then at the shape itself, fastest first (`_race`), only those within
  ``PROBE_SLOWER`` times the probe's fastest (none when one is left: it is
  chosen). The entry holds ``best``, ``seconds`` (the second round's medians),
  ``tuning_s`` (the wall time of both rounds, compiling included) and where they
  apply ``probe`` (shape and medians), ``abandoned`` (name -> ``[shape, times
  slower than the best]``) and ``errors``.
  """
  t0 = time.perf_counter()
  prior = CHEAPEST_FIRST.get(jax.devices()[0].platform, ())
  order = sorted(backends, key=lambda n: prior.index(n) if n in prior else len(prior))
  entry, abandoned, errors = {}, {}, {}
  with jax.ensure_compile_time_eval():
    probe = probe_shapes(x_shape, k_shape)
    if probe is not None:
      seconds, slow, errors = _race(backends, order, *probe, dtype, PROBE_SLOWER)
      entry["probe"] = {"shape": list(probe[0]), "seconds": seconds}
      fastest = min(seconds.values())
      slow.update({n: round(t / fastest, 1) for n, t in seconds.items()
                   if t > PROBE_SLOWER * fastest})
      abandoned.update({n: [list(probe[0]), r] for n, r in slow.items()})
      order = sorted((n for n in seconds if n not in slow), key=seconds.get)
    if len(order) == 1:   # nothing left to compare: the shape itself need not be timed
      times, slow, more_errors = {}, {}, {}
    else:
      times, slow, more_errors = _race(backends, order, x_shape, k_shape, dtype, SLOWER)
  abandoned.update({n: [list(x_shape), r] for n, r in slow.items()})
  errors.update(more_errors)
  entry.update(best=min(times, key=times.get) if times else order[0], seconds=times,
               tuning_s=round(time.perf_counter() - t0, 3))
  if abandoned:
    entry["abandoned"] = abandoned
  if errors:
    entry["errors"] = errors
  log.info("dwconv auto %s kernel %s: %s (%s); %s; tuned in %.1f s",
           "x".join(map(str, x_shape)), "x".join(map(str, k_shape[:-2])), entry["best"],
           f"{times[entry['best']]:.3g} s per call" if times else "the only one left",
           describe(entry), entry["tuning_s"])
  return entry


def describe(entry: dict) -> str:
  """What a table entry says of the backends that lost, in words."""
  words = [f"{n} {s:.3g} s" for n, s in entry["seconds"].items() if n != entry["best"]]
  words += [f"{n} left at {'x'.join(map(str, shape))} ({ratio}x slower)"
            for n, (shape, ratio) in entry.get("abandoned", {}).items()]
  words += [f"{n} failed to compile" for n in entry.get("errors", {})]
  return ", ".join(words) or "no other candidate"


def _choose_here(backends: Mapping[str, Backend], key: str, x_shape, k_shape, dtype) -> str:
  """This process's choice: from the table under the cache root, else measured and added."""
  table = read_table()
  if key not in table:
    table[key] = _measure(backends, x_shape, k_shape, dtype)
    try:
      storage.write_json(cachedir.path(TABLE), table, indent=1, sort_keys=True)
    except OSError as e:
      log.warning("dwconv auto: cannot write %s (%s); each trace measures again",
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
