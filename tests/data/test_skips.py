"""No scan lost, none mixed up: skip reports across datasets, the ledger, unreadable
folders (as an unprivileged user), the command's one-line error."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from covid3d.data import ledger as ledger_lib
from covid3d.data import preprocess, read_common, readers
from covid3d.data.skips import DataError, Skip, SkipLog
from tests import data_fixtures as fx

REPO = Path(__file__).resolve().parents[2]


def _run_preprocess(args, **kwargs):
  return subprocess.run([sys.executable, "-m", "covid3d.data.preprocess", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=300, **kwargs)


# --- SkipLog: tags, merging, one report ---------------------------------------


def test_skiplog_scope_merge_and_report(tmp_path):
  a, b = SkipLog(), SkipLog()
  with a.scope("cov19ctdb", "train"):
    a.add("/x/ct_scan_1", "empty\nscan   folder")
    with a.scope("cov19ctdb", "test"):
      a.add("/x/1.jpg", "bad", "slice")
    a.add("/x/notes.txt", "stray", "file")
  a.count_offered("cov19ctdb", "train", 3)
  a.count_built("cov19ctdb", "train", received=2, used=2)
  b.add("/y/2.mha", "truncated", dataset="stoic", partition="train")
  b.count_offered("stoic", "train", 1)
  both = a + b
  assert len(both) == 4 and len(a) == 3 and len(b) == 1
  assert both.entries[0] == Skip("/x/ct_scan_1", "empty scan folder", "scan", "cov19ctdb", "train")
  assert [(e.dataset, e.partition) for e in both] == [
      ("cov19ctdb", "train"), ("cov19ctdb", "test"), ("cov19ctdb", "train"), ("stoic", "train")]
  assert both.counts_by_partition() == {"cov19ctdb": {"train": {"scan": 1, "file": 1},
                                                      "test": {"slice": 1}},
                                        "stoic": {"train": {"scan": 1}}}
  ledger = both.ledger()
  assert [(r.dataset, r.partition, r.offered, r.used, r.skipped) for r in ledger] == [
      ("cov19ctdb", "train", 3, 2, 1), ("stoic", "train", 1, 0, 1)]
  assert ledger.ok
  c = SkipLog()
  c += a
  c.extend(b)
  assert c.entries == both.entries and c.ledger() == ledger
  report = json.loads(Path(both.write(tmp_path)).read_text())
  assert report["counts"] == {"scan": 2, "slice": 1, "file": 1}
  assert report["counts_by_partition"]["stoic"] == {"train": {"scan": 1}}
  assert report["skips"][3] == {"path": "/y/2.mha", "reason": "truncated", "what": "scan",
                                "dataset": "stoic", "partition": "train"}
  assert report["ledger"]["ok"] and report["ledger"]["rows"][0] == {
      "dataset": "cov19ctdb", "partition": "train", "offered": 3, "used": 2, "skipped": 1,
      "missing": 0, "ok": True}
  summary = both.summary()
  assert "cov19ctdb/train: offered 3 = used 2 + skipped 1" in summary
  assert "/y/2.mha (stoic/train): truncated" in summary


def test_ledger_flags_and_raises_on_a_mismatch():
  ledger = ledger_lib.tally({("a", "train"): 5, ("a", "test"): 2}, {("a", "train"): 3},
                            {("a", "train"): 1, ("a", "test"): 3})
  assert not ledger.ok
  assert [(r.partition, r.missing) for r in ledger.mismatches()] == [("test", -1), ("train", 1)]
  assert "MISMATCH, 1 scan(s) neither used nor skipped" in ledger.summary()
  assert "counted twice" in ledger.row("a", "test").describe()
  with pytest.raises(ledger_lib.LedgerError, match="a/train"):
    ledger.check()
  assert ledger_lib.tally({}, {("b", "x"): 2}, {}, received={("b", "x"): 2}).check().ok


def test_data_error_is_one_line():
  err = DataError("/x/a.mha", "Exception thrown in SimpleITK:\n  sitk::ERROR: bad\n")
  assert str(err) == "/x/a.mha: Exception thrown in SimpleITK: sitk::ERROR: bad"


# --- listings record into the SkipLog they are given, tagged ----------------------


def test_listings_tag_and_count_every_partition(tmp_path):
  fx.write_cov19ctdb(tmp_path / "c")
  (tmp_path / "c" / "test" / "ct_scan_8").mkdir()  # empty: rejected at listing
  fx.write_stoic(tmp_path / "s", {"1": fx.hu_volume(), "2": fx.hu_volume()}, {"1": (1, 0)})
  skips = SkipLog()
  for part in ("train", "validation", "test"):
    readers.list_cov19ctdb(tmp_path / "c", part, skips=skips)
  readers.list_stoic(tmp_path / "s", skips=skips)
  assert [(e.what, e.dataset, e.partition, Path(e.path).name) for e in skips] == [
      ("scan", "cov19ctdb", "test", "ct_scan_8"), ("scan", "stoic", "train", "2.mha")]
  assert dict(skips.offered) == {("cov19ctdb", "train"): 4, ("cov19ctdb", "validation"): 1,
                                 ("cov19ctdb", "test"): 2, ("stoic", "train"): 2}


# --- the ledger over listing + build_cache ----------------------------------------


def _corpus(root):
  """cov19ctdb train: 4 good + 1 empty folder + 1 with every slice corrupt;
  test: 1 good + 1 one-slice + 1 whose slices are all corrupt (rejected when read)."""
  fx.write_cov19ctdb(root)
  (root / "train" / "covid" / "ct_scan_9").mkdir()
  bad = root / "train" / "non-covid" / "ct_scan_3"
  fx.write_slices(bad, fx.ramp_scan(3))
  for p in bad.iterdir():
    p.write_bytes(b"junk")
  fx.write_slices(root / "test" / "ct_scan_1", fx.ramp_scan(1))
  fx.write_slices(root / "test" / "ct_scan_2", fx.ramp_scan(2))
  (root / "test" / "ct_scan_2" / "1.jpg").write_bytes(b"junk")


LEDGER = [("test", 3, 1, 2), ("train", 6, 4, 2)]  # (partition, offered, used, skipped)


def _rows(ledger):
  return [(r.partition, r.offered, r.used, r.skipped) for r in ledger]


def test_ledger_adds_up_over_two_partitions(tmp_path, capsys):
  _corpus(tmp_path / "data")
  skips = SkipLog()
  refs = {p: readers.list_cov19ctdb(tmp_path / "data", p, skips=skips) for p in ("train", "test")}
  assert {p: len(r) for p, r in refs.items()} == {"train": 5, "test": 2}
  paths = preprocess.build_cache(refs["train"] + refs["test"], tmp_path / "cache", (16,),
                                 workers=1, skips=skips, progress=False, workdir=tmp_path)
  assert len(paths) == 5
  assert _rows(skips.ledger().check()) == LEDGER
  out = capsys.readouterr().out
  assert "cov19ctdb/train: offered 6 = used 4 + skipped 2" in out
  report = json.loads((tmp_path / "skips.json").read_text())
  assert report["ledger"]["ok"]
  assert [(r["partition"], r["offered"], r["used"], r["skipped"])
          for r in report["ledger"]["rows"]] == LEDGER
  assert report["counts_by_partition"]["cov19ctdb"]["train"]["scan"] == 2
  # A ref dropped between listing and build is a mismatch, not silence.
  lost = SkipLog()
  refs = readers.list_cov19ctdb(tmp_path / "data", "train", skips=lost)
  preprocess.build_cache(refs[1:], tmp_path / "cache", (16,), workers=1, skips=lost,
                         progress=False, workdir=tmp_path / "lost")
  assert [r.missing for r in lost.ledger()] == [1]
  assert "MISMATCH, 1 scan(s) neither used nor skipped" in capsys.readouterr().out


def test_ledger_of_logs_per_partition_merged(tmp_path):
  _corpus(tmp_path / "data")
  total = SkipLog()
  for p in ("train", "test"):
    part = SkipLog()
    refs = readers.list_cov19ctdb(tmp_path / "data", p, skips=part)
    preprocess.build_cache(refs, tmp_path / "cache", (16,), workers=1, skips=part,
                           progress=False, workdir=tmp_path / p)
    assert json.loads((tmp_path / p / "skips.json").read_text())["ledger"]["ok"]
    total += part
  assert _rows(total.ledger().check()) == LEDGER
  assert sum(e.what == "scan" for e in total) == 4
  assert {e.partition for e in total} == {"train", "test"}


def test_stoic_ledger_with_a_bad_label_row(tmp_path):
  fx.write_stoic(tmp_path, {"1": fx.hu_volume(), "2": fx.hu_volume(), "3": fx.hu_volume()},
                 {"1": (1, 0), "2": ("maybe", 0)})
  skips = SkipLog()
  refs = readers.list_stoic(tmp_path, skips=skips)
  assert [r.scan_id for r in refs] == ["1"]
  # '2': its row is a 'label' skip and its volume a 'scan' skip; '3' has no row.
  assert sorted((e.what, Path(e.path).name) for e in skips) == [
      ("label", "reference.csv:3"), ("scan", "2.mha"), ("scan", "3.mha")]
  preprocess.build_cache(refs, tmp_path / "cache", (8,), workers=1, skips=skips,
                         progress=False)
  assert [(r.offered, r.used, r.skipped) for r in skips.ledger().check()] == [(3, 1, 2)]


def test_build_cache_without_a_listing_counts_what_it_got(tmp_path):
  fx.write_cov19ctdb(tmp_path / "data")
  refs = readers.list_cov19ctdb(tmp_path / "data", "train")
  skips = SkipLog()
  preprocess.build_cache(refs + refs[:1], tmp_path / "cache", (8,), workers=1, skips=skips,
                         progress=False)
  assert [(r.offered, r.used, r.skipped) for r in skips.ledger().check()] == [(5, 4, 1)]
  assert skips.entries[0].dataset == "cov19ctdb" and "duplicate" in skips.entries[0].reason


# --- an unreadable scan folder is that scan's skip --------------------------------


def test_unreadable_scan_folder_in_process(tmp_path, monkeypatch):
  """The listing's error handling, whoever runs the test (the error is injected)."""
  fx.write_cov19ctdb(tmp_path)
  bad = tmp_path / "train" / "covid" / "ct_scan_1"
  entries = read_common.entries

  def fake(folder):
    if Path(folder) == bad:
      raise PermissionError(13, "Permission denied", str(folder))
    return entries(folder)

  monkeypatch.setattr(read_common, "entries", fake)
  with pytest.raises(DataError) as err:
    readers.list_cov19ctdb(tmp_path, "train", strict=True)
  assert err.value.path == str(bad) and "Permission denied" in err.value.reason
  skips = SkipLog()
  refs = readers.list_cov19ctdb(tmp_path, "train", skips=skips)
  assert "covid/ct_scan_1" not in [r.scan_id for r in refs] and len(refs) == 3
  assert [(Path(e.path).name, e.what) for e in skips] == [
      ("ct_scan_1", "scan"), ("train_partition_covid_categories.csv:3", "label")]
  assert skips.entries[0].reason == "unreadable scan folder: Permission denied"
  assert "names scan 'ct_scan_1', which was skipped" in skips.entries[1].reason
  # A partition or class folder that cannot be read is a DataError in any mode.
  monkeypatch.setattr(read_common, "entries", lambda folder: (_ for _ in ()).throw(
      PermissionError(13, "Permission denied", str(folder))))
  with pytest.raises(DataError, match="unreadable partition folder"):
    readers.list_cov19ctdb(tmp_path, "train")


_AS_NOBODY = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    # Import everything first (the interpreter lives where 'nobody' may not read).
    import encodings.utf_8_sig, encodings.idna, csv, json
    import PIL.Image, SimpleITK, nibabel, tqdm, scipy.ndimage, scipy.sparse
    PIL.Image.init()
    from covid3d.data import preprocess
    if os.geteuid() == 0:
      try:
        os.setgroups([])
        os.setgid({gid})
        os.setuid({uid})
      except OSError:
        sys.exit(78)  # cannot drop privileges
    if os.access({bad!r}, os.R_OK):
      sys.exit(77)  # the mode does not stop this user
    preprocess.main({argv!r})
""")


def test_unreadable_scan_folder_as_unprivileged_user(capfd):
  """`chmod 000` on one scan folder, the command run by a user it stops."""
  if os.geteuid() == 0:
    try:
      import pwd  # pylint: disable=g-import-not-at-top
      nobody = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
      pytest.skip("no unprivileged user to run as")
    uid, gid = nobody.pw_uid, nobody.pw_gid
  else:
    uid, gid = os.geteuid(), os.getegid()
  top = Path(tempfile.mkdtemp(prefix="covid3d-unreadable-"))
  bad = top / "data" / "train" / "covid" / "ct_scan_2"  # (not in the severity CSV)
  try:
    top.chmod(0o755)
    fx.write_cov19ctdb(top / "data")
    out = top / "out"
    out.mkdir()
    out.chmod(0o777)
    bad.chmod(0)
    argv = ["cov19ctdb", str(top / "data"), str(out), "--partitions", "train", "--sizes", "8",
            "--workers", "1"]
    script = _AS_NOBODY.format(repo=str(REPO), uid=uid, gid=gid, bad=str(bad), argv=argv)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    if run.returncode == 77:
      pytest.skip("chmod 000 does not stop reads for the user the test can run as")
    if run.returncode == 78:
      pytest.skip("cannot drop privileges here")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    report = json.loads((out / "cov19ctdb" / "train" / "skips.json").read_text())
    assert [(s["path"], s["what"], s["dataset"], s["partition"]) for s in report["skips"]] == [
        (str(bad), "scan", "cov19ctdb", "train")]
    assert "Permission denied" in report["skips"][0]["reason"]
    assert report["ledger"]["rows"] == [{"dataset": "cov19ctdb", "partition": "train",
                                         "offered": 4, "used": 3, "skipped": 1, "missing": 0,
                                         "ok": True}]
    index = (out / "cov19ctdb" / "index.csv").read_text()
    for good in ("covid/ct_scan_0", "covid/ct_scan_1", "non-covid/ct_scan_0"):
      assert good in index
    assert "covid/ct_scan_2" not in index
    combined = json.loads((out / "cov19ctdb" / "skips.json").read_text())
    assert combined["ledger"]["ok"] and len(combined["skips"]) == 1
  finally:
    if bad.exists():
      bad.chmod(0o755)
    shutil.rmtree(top, ignore_errors=True)


# --- the command: a DataError is one line and status 2 ------------------------------


def test_command_strict_error_is_one_line(tmp_path):
  folder = tmp_path / "data" / "test" / "ct_scan_0"
  fx.write_slices(folder, fx.ramp_scan(3))
  (folder / "1.jpg").write_bytes(b"junk")
  run = _run_preprocess(["cov19ctdb", tmp_path / "data", tmp_path / "out", "--partitions",
                         "test", "--sizes", "8", "--workers", "1", "--strict"])
  assert run.returncode == 2, run.stderr
  assert "Traceback" not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("python -m covid3d.data.preprocess: error: ")
  assert f'{folder / "1.jpg"}: unreadable image' in last
  # Without --strict the same corpus runs to the end.
  run = _run_preprocess(["cov19ctdb", tmp_path / "data", tmp_path / "out", "--partitions",
                         "test", "--sizes", "8", "--workers", "1"])
  assert run.returncode == 0, run.stderr
  assert "cov19ctdb/test: offered 1 = used 1 + skipped 0" in run.stdout
  # A missing partition folder (a DataError in any mode) is one line too.
  run = _run_preprocess(["cov19ctdb", tmp_path / "data", tmp_path / "out", "--partitions",
                         "train", "--sizes", "8", "--workers", "1"])
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert "partition folder not found" in run.stderr.strip().splitlines()[-1]
