"""timm's Mixup / CutMix, drawn per global batch and applied to this process's share."""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mixup:
  """timm Mixup/CutMix, drawn per global batch and applied to this process's slice.

  Example j of a global batch is mixed with example j XOR 1 (its neighbour;
  the batch is a random permutation, so this is a random pairing like timm's
  j <-> B-1-j, but one that stays inside every process's slice when the slice
  is even). With probability `prob` a batch (mode 'batch') or a pair (mode
  'pair') is mixed: CutMix with probability `switch_prob` when both alphas are
  positive, lam ~ Beta(alpha, alpha), the CutMix box from lam and lam then
  corrected to the box's area (timm ``correct_lam``).

  Attributes:
    mixup_alpha, cutmix_alpha: Beta parameters; 0 disables that kind.
    prob: probability of mixing a batch / pair.
    switch_prob: probability of CutMix instead of mixup when both are on.
    mode: 'batch' (one lam and box per global batch; timm's default, where
      a "batch" is one GPU's) or 'pair' (one per pair of examples).
  """
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  mode: str = "batch"

  def __post_init__(self):
    if self.mode not in ("batch", "pair"):
      raise ValueError(f"mixup mode {self.mode!r} is not 'batch' or 'pair'")

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  def params(self, rng: np.random.Generator, pairs: int, size: int):
    """lam, CutMix flag and box (y0, y1, x0, x1) per pair: arrays of `pairs` rows."""
    n = 1 if self.mode == "batch" else pairs
    mixed = rng.random(n) < self.prob
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      cut = rng.random(n) < self.switch_prob
    else:
      cut = np.full(n, self.cutmix_alpha > 0)
    lam = np.where(cut, rng.beta(max(self.cutmix_alpha, 1e-6), max(self.cutmix_alpha, 1e-6), n),
                   rng.beta(max(self.mixup_alpha, 1e-6), max(self.mixup_alpha, 1e-6), n))
    lam = np.where(mixed, lam, 1.0)
    cut &= mixed
    # timm rand_bbox: a square of side S * sqrt(1 - lam) around a uniform centre, clipped.
    cut_len = (size * np.sqrt(1.0 - lam)).astype(np.int64)
    cy, cx = rng.integers(0, size, n), rng.integers(0, size, n)
    y0, y1 = np.clip(cy - cut_len // 2, 0, size), np.clip(cy + cut_len // 2, 0, size)
    x0, x1 = np.clip(cx - cut_len // 2, 0, size), np.clip(cx + cut_len // 2, 0, size)
    lam = np.where(cut, 1.0 - (y1 - y0) * (x1 - x0) / float(size * size), lam)
    box = np.stack([y0, y1, x0, x1], -1)
    if n == 1:
      lam, cut, box = (np.repeat(a, pairs, 0) for a in (lam, cut, box))
    return lam.astype(np.float32), cut, box

  def __call__(self, batch: dict, rng: np.random.Generator, global_batch: int,
               start: int) -> dict:
    """Mixes `batch` (positions [start, start + b) of the global batch, b even).

    Adds 'label_mix' (the partner's label) and 'mix_lam' (weight of 'label').
    A float32 'image' is mixed in place.
    """
    image = batch["image"]
    b, size = image.shape[0], image.shape[1]
    if b % 2 or start % 2:
      raise ValueError(f"mixup pairs examples: the per-process batch ({b}) must be even")
    lam, cut, box = self.params(rng, global_batch // 2, size)
    pair = slice(start // 2, start // 2 + b // 2)
    lam, cut, box = (np.repeat(a[pair], 2, 0) for a in (lam, cut, box))
    partner = np.arange(b) ^ 1
    # Two batch-sized float arrays: the result (in place in a float32 image)
    # and the partners' originals.
    x = image if image.dtype == np.float32 else image.astype(np.float32)
    other = x[partner]
    for i in np.nonzero(cut)[0]:
      y0, y1, x0, x1 = box[i]
      x[i, y0:y1, x0:x1] = other[i, y0:y1, x0:x1]
    w = np.where(cut, 1.0, lam).astype(np.float32).reshape((b,) + (1,) * (x.ndim - 1))
    x *= w
    other *= 1.0 - w
    x += other
    mixed = np.clip(np.rint(x), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else x
    out = dict(batch)
    out["image"] = mixed
    out["label_mix"] = batch["label"][partner]
    out["mix_lam"] = lam
    return out
