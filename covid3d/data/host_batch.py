"""Each process's share of a global batch: the one place that splits it across hosts.

Every process cuts the same stream of record indices into global batches of
G; process p then takes positions ``[p * b, (p + 1) * b)`` of each, with
``b = G / process_count``, so together the processes see every global batch
exactly once and the global batch does not depend on the process count.
"""


def host_share(global_batch_size: int, num_records: int, *, train: bool, process_index: int,
               process_count: int, records: str = "records") -> tuple[int, int]:
  """Positions ``[start, start + b)`` of every global batch that this process takes.

  Args:
    global_batch_size: G, the batch summed over all processes.
    num_records: N, the records to batch.
    train: the last incomplete global batch is dropped (N must be at least
      G); False: it is padded (N must be positive).
    process_index, process_count: this process and the number of processes.
    records: what the records are, for the message (e.g. ``'images'``).

  Returns:
    ``(start, b)``: ``b = G / process_count``, ``start = process_index * b``.

  Raises:
    ValueError: G not a positive multiple of the process count, or too few records.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                     f"the process count {process_count}")
  if num_records == 0 or (train and num_records < global_batch_size):
    raise ValueError(f"{num_records} {records}, fewer than one global batch of "
                     f"{global_batch_size}")
  per_host = global_batch_size // process_count
  return process_index * per_host, per_host
