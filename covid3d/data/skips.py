"""Bad input: `DataError` (strict mode) and `SkipLog` (everything else).

Every reader and the preprocessor report a bad file through `reject` (strict:
raise `DataError`; otherwise log a warning and record it in the `SkipLog`) or,
for harmless things that never stop a run (stray non-image files, slices
dropped for an inconsistent size, a scan without a class folder), through
`note`. Each entry carries the dataset and partition it belongs to (set by the
listing, `load_scan` and `build_cache` through `SkipLog.scope`), so one
SkipLog can collect a whole run; logs merge with `extend` or `+`.

A SkipLog also keeps the scan counts of the ledger (`covid3d.data.ledger`):
the listings add what they found, `build_cache` what it got and used, and
`SkipLog.ledger()` checks offered == used + skipped per dataset/partition.
A run ends with `SkipLog.summary()` printed and `SkipLog.write(workdir)` ->
`skips.json` (every entry, counts per kind and per dataset/partition/kind,
the ledger).
"""
import collections
import contextlib
import dataclasses
import logging

from covid3d import storage
from covid3d.data import ledger as ledger_lib

log = logging.getLogger("covid3d.data")

SKIPS_FILE = "skips.json"


def one_line(text) -> str:
  """`text` with every run of whitespace (newlines included) made one space."""
  return " ".join(str(text).split())


class DataError(Exception):
  """A bad input file; `path` names it and `reason` says what is wrong.

  `str()` is one line, '<path>: <reason>' (newlines in library messages are
  folded), fit to print as a command's error message.
  """

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = one_line(reason)
    super().__init__(f"{self.path}: {self.reason}".replace("\n", "\\n"))

  def __reduce__(self):  # picklable across worker processes
    return (DataError, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class Skip:
  """One skipped thing.

  Attributes:
    path: the file or folder (for a CSV row, '<csv>:<line>').
    reason: why it was skipped.
    what: 'scan' (a whole scan dropped), 'slice' (one slice of a scan),
      'file' (a stray file), 'label' (a CSV row ignored, or a scan kept
      without a label).
    dataset: 'cov19ctdb', 'lesions', 'stoic', or '' when unknown.
    partition: 'train', 'validation', 'test', or '' when unknown.
  """
  path: str
  reason: str
  what: str = "scan"
  dataset: str = ""
  partition: str = ""


class SkipLog:
  """Collects the skips (and ledger counts) of a run.

  Not thread-safe; worker processes keep their own and the parent merges
  them (`extend`). `log_a + log_b` is a new log holding both.
  """

  def __init__(self, entries=()):
    self.entries: list[Skip] = list(entries)
    self.offered: collections.Counter = collections.Counter()   # listings: scans found
    self.received: collections.Counter = collections.Counter()  # build_cache: refs got
    self.used: collections.Counter = collections.Counter()      # build_cache: records
    self._scope = ("", "")

  @contextlib.contextmanager
  def scope(self, dataset: str, partition: str):
    """Within it, entries added without a dataset/partition get these."""
    old = self._scope
    self._scope = (dataset or "", partition or "")
    try:
      yield self
    finally:
      self._scope = old

  def add(self, path, reason: str, what: str = "scan", *, dataset: str | None = None,
          partition: str | None = None) -> None:
    """Records (and logs as a warning) that `path` was skipped for `reason`."""
    reason = one_line(reason)
    dataset = self._scope[0] if dataset is None else dataset
    partition = self._scope[1] if partition is None else partition
    where = f" ({dataset}/{partition})" if dataset or partition else ""
    log.warning("skipped %s %s%s: %s", what, path, where, reason)
    self.entries.append(Skip(str(path), reason, what, dataset, partition))

  def count_offered(self, dataset: str, partition: str, n: int) -> None:
    """A listing found `n` scans (listed or rejected) in one partition."""
    self.offered[(dataset, partition)] += n

  def count_built(self, dataset: str, partition: str, *, received: int, used: int) -> None:
    """`build_cache` got `received` ScanRefs of one partition and made `used` records."""
    self.received[(dataset, partition)] += received
    self.used[(dataset, partition)] += used

  def extend(self, other) -> "SkipLog":
    """Adds another SkipLog (entries and counts) or Skip entries recorded
    (and logged) elsewhere, e.g. in a worker. Returns self."""
    if isinstance(other, SkipLog):
      self.entries.extend(other.entries)
      for mine, theirs in ((self.offered, other.offered), (self.received, other.received),
                           (self.used, other.used)):
        mine.update(theirs)  # (keeps rows counted as 0)
    else:
      self.entries.extend(other)
    return self

  def __add__(self, other: "SkipLog") -> "SkipLog":
    if not isinstance(other, SkipLog):
      return NotImplemented
    return SkipLog().extend(self).extend(other)

  def __iadd__(self, other) -> "SkipLog":
    return self.extend(other)

  def __len__(self) -> int:
    return len(self.entries)

  def __iter__(self):
    return iter(self.entries)

  def counts(self) -> dict:
    """{kind: n} over all entries."""
    return dict(collections.Counter(e.what for e in self.entries))

  def counts_by_partition(self) -> dict:
    """{dataset: {partition: {kind: n}}} ('' for unknown)."""
    out = {}
    for e in self.entries:
      kinds = out.setdefault(e.dataset, {}).setdefault(e.partition, {})
      kinds[e.what] = kinds.get(e.what, 0) + 1
    return out

  def ledger(self) -> ledger_lib.Ledger:
    """Offered, used and skipped scans per dataset/partition (`covid3d.data.ledger`)."""
    skipped = collections.Counter((e.dataset, e.partition) for e in self.entries
                                  if e.what == "scan")
    return ledger_lib.tally(self.offered, self.used, skipped, self.received)

  def summary(self, pairs=None) -> str:
    """Human-readable counts per kind, every entry, then the ledger.

    Args:
      pairs: show the ledger rows of these (dataset, partition) pairs only
        (None: all).
    """
    if not self.entries:
      lines = ["nothing skipped"]
    else:
      counts = self.counts()
      lines = ["skipped: " + ", ".join(f"{n} {w}(s)" for w, n in sorted(counts.items()))]
      for e in self.entries:
        where = f" ({e.dataset}/{e.partition})" if e.dataset or e.partition else ""
        lines.append(f"  [{e.what}] {e.path}{where}: {e.reason}")
    ledger = self.ledger()
    if pairs is not None:
      ledger = ledger.select(pairs)
    if len(ledger):
      lines.append(ledger.summary())
    return "\n".join(lines)

  def to_json(self) -> dict:
    """What `write` writes."""
    return {"counts": self.counts(),
            "counts_by_partition": self.counts_by_partition(),
            "ledger": self.ledger().to_json(),
            "skips": [dataclasses.asdict(e) for e in self.entries]}

  def write(self, workdir) -> str:
    """Writes `<workdir>/skips.json` atomically; returns its path.

    Keys: 'counts' ({kind: n}), 'skips' (every entry: path, reason, what,
    dataset, partition), 'counts_by_partition' ({dataset: {partition: {kind:
    n}}}) and 'ledger' ({'ok', 'rows': [{dataset, partition, offered, used,
    skipped, missing, ok}]}).
    """
    return str(storage.write_json(storage.as_path(workdir) / SKIPS_FILE, self.to_json(),
                                  indent=1))


def reject(path, reason: str, *, strict: bool, skips: SkipLog | None,
           what: str = "scan") -> None:
  """Bad input: raises `DataError` if `strict`, else logs and records a skip."""
  if strict:
    raise DataError(path, reason)
  note(path, reason, skips=skips, what=what)


def note(path, reason: str, *, skips: SkipLog | None, what: str) -> None:
  """A skip that never stops a run (logged; recorded when `skips` is given)."""
  if skips is None:
    log.warning("skipped %s %s: %s", what, path, one_line(reason))
  else:
    skips.add(path, reason, what)
