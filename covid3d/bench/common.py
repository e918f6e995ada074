"""Shared helpers of the benchmarks: the device line, a plain-text table, compiling with
XLA's memory plan, peak device memory and the one markdown table that
``covid3d/bench/gpu_check.sh`` collects."""
import math
import os
import platform
import time

import jax


def device_line() -> str:
  """What the figures were measured on, e.g. ``device: cpu (cpu) x1, jax 0.10.2, 2 host cores``."""
  devs = jax.devices()
  return (f"device: {devs[0].platform} ({devs[0].device_kind}) x{len(devs)}, "
          f"jax {jax.__version__}, {os.cpu_count()} host cores, {platform.machine()}")


def _fmt(v):
  if isinstance(v, float):
    if math.isnan(v):
      return "-"
    return f"{v:.4g}"
  return str(v)


def print_table(rows, header=True):
  """Prints dict rows as aligned columns (keys of the first row as the header)."""
  if not rows:
    return
  keys = list(rows[0])
  width = {k: max([len(k)] + [len(_fmt(r.get(k, ""))) for r in rows]) + 2 for k in keys}
  width = {k: max(w, 12) for k, w in width.items()}
  if header:
    print("".join(k.ljust(width[k]) for k in keys))
  for r in rows:
    print("".join(_fmt(r.get(k, "")).ljust(width[k]) for k in keys), flush=True)


def compile_timed(jitted, *args):
  """Compiles ``jitted`` for ``args``: ``(compiled, compile seconds, planned bytes)``.

  The planned bytes are XLA's buffer assignment of the compiled program
  (arguments + outputs + temporaries - aliased; every platform), None where the
  backend reports no ``memory_analysis``.
  """
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  plan = None
  if mem is not None:
    plan = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  return compiled, seconds, plan


def peak_device_bytes():
  """Peak bytes in use on the first device since the process started, where the
  runtime reports it (GPU/TPU: ``memory_stats()['peak_bytes_in_use']``), else None."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return stats.get("peak_bytes_in_use")


def gib(nbytes) -> float:
  """Bytes as GiB, NaN (printed ``-``) when unknown."""
  return nbytes / 2**30 if nbytes is not None else float("nan")


MARKDOWN_HEADER = "| step | what | figures |\n| --- | --- | --- |\n"


def append_markdown(path, step: str, rows, what_key: str):
  """Appends ``rows`` to the one markdown table in ``path`` (header if the file is new).

  Each row becomes ``| step | row[what_key] | key value, key value, ... |``, so
  every benchmark can add to one table whatever its columns.
  """
  if not path:
    return
  has_table = False
  if os.path.exists(path):
    with open(path) as f:
      has_table = MARKDOWN_HEADER.splitlines()[0] in f.read()
  with open(path, "a") as f:
    if not has_table:
      f.write(MARKDOWN_HEADER)
    for r in rows:
      figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k != what_key)
      f.write(f"| {step} | {r.get(what_key, '')} | {figures} |\n")


def random_params(model, x, seed: int = 0, scale: float = 0.02):
  """Parameters of ``model`` for input ``x``: shapes from ``jax.eval_shape``, values
  drawn on the host (normal * ``scale``; LayerNorm scales and layer scales 1).

  For timing only: compiling ``model.init`` (one random sampler per parameter
  shape) takes longer on a CPU than the step it would initialise.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  shapes = jax.eval_shape(model.init, jax.random.key(seed), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']") or name.endswith("['gamma']"):
      return jax.numpy.ones(s.shape, s.dtype)
    return jax.numpy.asarray(scale * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
