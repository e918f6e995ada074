"""The scan-count ledger: every scan offered is either used or skipped.

Per dataset and partition, `offered` scans (what a listing found on disk:
the ScanRefs it returned plus the scans it rejected) must equal the `used`
ones (records `build_cache` produced or found cached) plus the `skipped` ones
(skips of kind 'scan' in the run's `SkipLog`, each with its reason). A
difference means a scan was lost (or counted twice) without a word: the
ledger flags it (`mismatches`, the summary) or raises (`check`).

`SkipLog` gathers the three counts as a run goes (the listings and
`build_cache` add them) and `SkipLog.ledger()` makes the Ledger; `tally`
makes one from plain counts.
"""
import dataclasses


class LedgerError(Exception):
  """The scan counts do not add up (a scan lost or counted twice)."""


@dataclasses.dataclass(frozen=True)
class Row:
  """The scan counts of one dataset partition.

  Attributes:
    dataset, partition: which (either may be '' when unknown).
    offered: scans found by the listing (or, where nothing was listed in this
      run, the ScanRefs handed to `build_cache`).
    used: records produced or found in the cache.
    skipped: scans dropped with a reason (skips of kind 'scan').
  """
  dataset: str
  partition: str
  offered: int = 0
  used: int = 0
  skipped: int = 0

  @property
  def missing(self) -> int:
    """Scans neither used nor skipped (negative: counted twice)."""
    return self.offered - self.used - self.skipped

  @property
  def ok(self) -> bool:
    return self.missing == 0

  def describe(self) -> str:
    where = f'{self.dataset or "?"}/{self.partition or "?"}'
    line = f"{where}: offered {self.offered} = used {self.used} + skipped {self.skipped}"
    if self.ok:
      return line
    what = (f"{self.missing} scan(s) neither used nor skipped" if self.missing > 0
            else f"{-self.missing} scan(s) counted twice")
    return (f"{where}: offered {self.offered} != used {self.used} + skipped "
            f"{self.skipped}: MISMATCH, {what}")


@dataclasses.dataclass(frozen=True)
class Ledger:
  """Rows per (dataset, partition), sorted."""
  rows: tuple[Row, ...] = ()

  def __iter__(self):
    return iter(self.rows)

  def __len__(self) -> int:
    return len(self.rows)

  def row(self, dataset: str, partition: str) -> Row:
    """The row of one partition (all zero if it has none)."""
    for r in self.rows:
      if (r.dataset, r.partition) == (dataset, partition):
        return r
    return Row(dataset, partition)

  @property
  def ok(self) -> bool:
    return all(r.ok for r in self.rows)

  def mismatches(self) -> list[Row]:
    return [r for r in self.rows if not r.ok]

  def check(self) -> "Ledger":
    """Returns self; raises LedgerError naming every partition that does not add up."""
    bad = self.mismatches()
    if bad:
      raise LedgerError("scan counts do not add up: " + "; ".join(r.describe() for r in bad))
    return self

  def select(self, pairs) -> "Ledger":
    """The rows of the given (dataset, partition) pairs only."""
    pairs = set(pairs)
    return Ledger(tuple(r for r in self.rows if (r.dataset, r.partition) in pairs))

  def summary(self) -> str:
    """One line per partition ('offered N = used U + skipped S' or a MISMATCH)."""
    if not self.rows:
      return "no scans counted"
    return "\n".join(["scans per dataset/partition:"] + [f"  {r.describe()}" for r in self.rows])

  def to_json(self) -> dict:
    return {"ok": self.ok,
            "rows": [{**dataclasses.asdict(r), "missing": r.missing, "ok": r.ok}
                     for r in self.rows]}


def tally(offered: dict, used: dict, skipped: dict, received: dict | None = None) -> Ledger:
  """The ledger of plain counts.

  Args:
    offered: {(dataset, partition): scans a listing found}.
    used: {(dataset, partition): records built or cached}.
    skipped: {(dataset, partition): scans skipped with a reason}.
    received: {(dataset, partition): ScanRefs handed to build_cache}; stands
      in for `offered` in partitions no listing counted.

  Returns:
    A Ledger with a row for every pair in any of the counts.
  """
  received = received or {}
  keys = set(offered) | set(used) | set(skipped) | set(received)
  return Ledger(tuple(
      Row(d, p, offered=int(offered[(d, p)] if (d, p) in offered else received.get((d, p), 0)),
          used=int(used.get((d, p), 0)), skipped=int(skipped.get((d, p), 0)))
      for d, p in sorted(keys)))
