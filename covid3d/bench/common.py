"""Shared helpers of the benchmarks: the device line and a plain-text table."""
import math
import os
import platform

import jax


def device_line() -> str:
  """What the figures were measured on, e.g. ``device: cpu (cpu) x1, jax 0.10.2, 2 host cores``."""
  devs = jax.devices()
  return (f"device: {devs[0].platform} ({devs[0].device_kind}) x{len(devs)}, jax {jax.__version__}, "
          f"{os.cpu_count()} host cores, {platform.machine()}")


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
