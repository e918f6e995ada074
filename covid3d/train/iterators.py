"""An in-memory, checkpointable batch iterator (demos, tests, small data sets)."""
import numpy as np


class ArrayIterator:
  """Endless shuffled epochs over in-memory arrays, split across processes.

  Each epoch is a permutation of the examples drawn from ``(seed, epoch)``;
  the global batch ``k`` of an epoch is its examples ``[k * batch_size,
  (k + 1) * batch_size)`` and this process yields its contiguous share
  (``batch_size / process_count`` examples), so all processes together see
  the same global batch whatever their number. The incomplete last batch of
  an epoch is dropped.

  Args:
    arrays: dict name -> array with a common leading axis of N examples.
    batch_size: int, GLOBAL batch size (<= N, divisible by ``process_count``).
    seed: int, shuffling seed.
    process_index, process_count: this process's slot.
    shuffle: False keeps the stored order.
  """

  def __init__(self, arrays: dict, batch_size: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True):
    sizes = {name: len(a) for name, a in arrays.items()}
    self.num_examples = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1:
      raise ValueError(f"ArrayIterator: arrays differ in length: {sizes}")
    if not 0 < batch_size <= self.num_examples or batch_size % process_count:
      raise ValueError(f"ArrayIterator: batch_size={batch_size} must be in "
                       f"[1, {self.num_examples}] and divisible by {process_count} processes")
    self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.epoch, self.batch = 0, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if (self.batch + 1) * self.batch_size > self.num_examples:
      self.epoch, self.batch = self.epoch + 1, 0
    order = (np.random.default_rng((self.seed, self.epoch)).permutation(self.num_examples)
             if self.shuffle else np.arange(self.num_examples))
    share = self.batch_size // self.process_count
    start = self.batch * self.batch_size + self.process_index * share
    index = order[start:start + share]
    self.batch += 1
    return {name: a[index] for name, a in self.arrays.items()}

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def set_state(self, state: dict):
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
