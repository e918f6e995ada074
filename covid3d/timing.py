"""Wall-clock timing of jitted calls (used by ``dwconv_impl='auto'`` and the benchmarks)."""
import time

import jax
import numpy as np


def median_seconds(fn, *args, reps: int = 3, warmup: int = 1) -> float:
  """Median seconds of ``fn(*args)`` until its results are ready, after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
