"""The predicting stages' split of the scans across processes, and the gather of the results.

``pseudolabel`` and ``predict`` run a model on one device per process, so a
pod splits their scans: the records are cut into batches of
``train.eval_batch_size`` consecutive records (the batches one process would
read), and batch k goes to process k mod the process count. Each scan is
predicted once per pod, in the same batch at the same place as on one
process, so the results are the same bit for bit; `gather` brings every
process's results together in record order.
"""
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from covid3d.data import pipeline


def share(n: int, batch: int, process_index: int, process_count: int) -> np.ndarray:
  """Record indices (int64, ascending) of ``process_index``'s batches of ``range(n)``."""
  starts = range(process_index * batch, n, process_count * batch)
  return np.array([i for s in starts for i in range(s, min(s + batch, n))], np.int64)


def batches(source, fields, config):
  """(an iterator of this process's padded batches (numpy) of its `share` of every record of
  ``source``, their number).

  Keys as ``pipeline.host_dataset`` (``valid``, ``record_index`` among them);
  none when this process's share is empty (fewer batches than processes).
  """
  size = config.train.eval_batch_size
  mine = share(len(source.index), size, jax.process_index(), jax.process_count())
  logging.info("process %d of %d predicts %d of the %d scans of %s", jax.process_index(),
               jax.process_count(), len(mine), len(source.index), source.name)
  if not len(mine):
    return iter(()), 0
  return iter(pipeline.host_dataset(source, mine, global_batch_size=size, fields=fields,
                                    train=False, threads=config.data.loader_threads)), \
      -(-len(mine) // size)


def gather(record_index: np.ndarray, rows: np.ndarray, n: int, batch: int):
  """Every process's ``(record_index, rows)`` of `batches` (its share of ``n`` records in
  batches of ``batch``), concatenated in record order; on every process.

  Args:
    record_index: int (m,), this process's records (``m`` its share's size).
    rows: (m, ...) their results, a dtype of at most 32 bits (JAX's default types: sent as
      they are, bit for bit).

  Returns:
    (int64 (n,) record indices ascending, (n, ...) rows).
  """
  count = jax.process_count()
  if count == 1:
    order = np.argsort(record_index, kind="stable")
    return np.asarray(record_index, np.int64)[order], np.asarray(rows)[order]
  longest = max(len(share(n, batch, p, count)) for p in range(count))
  index = np.full((longest,), -1, np.int32)
  index[:len(record_index)] = record_index
  padded = np.zeros((longest, *np.shape(rows)[1:]), np.asarray(rows).dtype)
  padded[:len(rows)] = rows
  all_index, all_rows = (np.asarray(a) for a in multihost_utils.process_allgather(
      (index, padded)))
  keep = all_index.reshape(-1) >= 0
  all_index = all_index.reshape(-1)[keep].astype(np.int64)
  all_rows = all_rows.reshape(-1, *np.shape(rows)[1:])[keep]
  order = np.argsort(all_index, kind="stable")
  return all_index[order], all_rows[order]
