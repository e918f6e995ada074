"""Bad input: `DataError` (strict mode) and `SkipLog` (everything else).

Every reader and the preprocessor report a bad file through `reject` (strict:
raise `DataError`; otherwise log a warning and record it in the `SkipLog`) or,
for harmless things that never stop a run (stray non-image files, slices
dropped for an inconsistent size), through `note`. A run ends with
`SkipLog.summary()` printed and `SkipLog.write(workdir)` -> `skips.json`.
"""
import collections
import dataclasses
import json
import logging
import os
from pathlib import Path

log = logging.getLogger('covid3d.data')

SKIPS_FILE = 'skips.json'


class DataError(Exception):
  """A bad input file; `path` names it and `reason` says what is wrong."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f'{self.path}: {reason}')

  def __reduce__(self):  # picklable across worker processes
    return (DataError, (self.path, self.reason))


@dataclasses.dataclass(frozen=True)
class Skip:
  """One skipped thing.

  Attributes:
    path: the file or folder.
    reason: why it was skipped.
    what: 'scan' (a whole scan dropped), 'slice' (one slice of a scan),
      'file' (a stray file), 'label' (a CSV row ignored).
  """
  path: str
  reason: str
  what: str = 'scan'


class SkipLog:
  """Collects the skips of one run (not thread-safe; merge across processes)."""

  def __init__(self, entries=()):
    self.entries: list[Skip] = list(entries)

  def add(self, path, reason: str, what: str = 'scan') -> None:
    """Records (and logs as a warning) that `path` was skipped for `reason`."""
    log.warning('skipped %s %s: %s', what, path, reason)
    self.entries.append(Skip(str(path), reason, what))

  def extend(self, entries) -> None:
    """Adds entries recorded (and logged) elsewhere, e.g. in a worker."""
    self.entries.extend(entries)

  def __len__(self) -> int:
    return len(self.entries)

  def summary(self) -> str:
    """Human-readable counts per kind, then every entry."""
    if not self.entries:
      return 'nothing skipped'
    counts = collections.Counter(e.what for e in self.entries)
    head = 'skipped: ' + ', '.join(f'{n} {w}(s)' for w, n in sorted(counts.items()))
    return '\n'.join([head] + [f'  [{e.what}] {e.path}: {e.reason}' for e in self.entries])

  def write(self, workdir) -> str:
    """Writes `<workdir>/skips.json` atomically; returns its path."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(workdir, SKIPS_FILE)
    counts = collections.Counter(e.what for e in self.entries)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'counts': dict(counts),
                 'skips': [dataclasses.asdict(e) for e in self.entries]}, f, indent=1)
    os.replace(tmp, path)
    return path


def reject(path, reason: str, *, strict: bool, skips: SkipLog | None,
           what: str = 'scan') -> None:
  """Bad input: raises `DataError` if `strict`, else logs and records a skip."""
  if strict:
    raise DataError(path, reason)
  note(path, reason, skips=skips, what=what)


def note(path, reason: str, *, skips: SkipLog | None, what: str) -> None:
  """A skip that never stops a run (logged; recorded when `skips` is given)."""
  if skips is None:
    log.warning('skipped %s %s: %s', what, path, reason)
  else:
    skips.add(path, reason, what)
