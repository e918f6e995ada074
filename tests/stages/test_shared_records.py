"""One record store for every process: each record written once, read by all.

Two JAX processes on 127.0.0.1, joined by ``jax.distributed`` as a pod's
hosts, build one dataset into one folder (``data.records_dir``): each
preprocesses its share of the scans, and each returns every record. Their
write counts (the line ``build_cache`` prints) add up to the number of
records, the files equal a 1-process build's, and a rerun writes nothing.
Then a training stage run by 2 processes from a store in a bucket (the GCS
emulator) ends with the same parameters, bit for bit, as 1 process with a
cache of its own.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import portpicker
import pytest

import data_fixtures as fx
import gcs_emulator
import train_helpers as h
from covid3d import storage
from covid3d.data import cache, preprocess, readers
from covid3d.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = (8, 12)
WROTE = re.compile(r"process (\d) of 2 wrote (\d+) records and found (\d+) of its (\d+)")

_BUILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    from jax.experimental import multihost_utils
    from covid3d.data import preprocess, readers
    refs = readers.list_cov19ctdb(sys.argv[3], "train")
    paths = preprocess.build_cache(refs, sys.argv[4], (8, 12), workers=1, progress=False,
                                   share=(jax.process_index(), 2),
                                   sync=multihost_utils.sync_global_devices)
    print(json.dumps(paths))
    """)


def build_on_two_processes(root, store) -> list[tuple[list, tuple]]:
  """[(paths, (wrote, found, share size))] of processes 0 and 1."""
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD, f"127.0.0.1:{port}", str(pid),
                             str(root), str(store)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  out = []
  for pid, proc in enumerate(procs):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    (counts,) = [m.groups() for m in WROTE.finditer(stdout)]
    assert int(counts[0]) == pid
    out.append((json.loads(stdout.strip().splitlines()[-1]), tuple(map(int, counts[1:]))))
  return out


def test_two_processes_write_each_record_once(tmp_path):
  fx.write_cov19ctdb(tmp_path / "data")
  for k in range(2):  # a scan listed, then skipped when read: its skip is one process's
    junk = tmp_path / "data" / "train" / "covid" / "ct_scan_3" / f"{k}.jpg"
    junk.parent.mkdir(exist_ok=True)
    junk.write_bytes(b"junk")
  refs = readers.list_cov19ctdb(tmp_path / "data", "train")
  alone = preprocess.build_cache(refs, tmp_path / "alone", SIZES, workers=1, progress=False)
  assert len(refs) == 5 and len(alone) == 4   # the junk scan is skipped
  store = tmp_path / "store"

  first = build_on_two_processes(tmp_path / "data", store)
  # Positions 0, 2, 4 and 1, 3: each process wrote its own scans' records, none twice.
  assert [counts for _, counts in first] in ([(2, 0, 3), (2, 0, 2)], [(3, 0, 3), (1, 0, 2)])
  assert sum(wrote for _, (wrote, _, _) in first) == len(alone)
  assert first[0][0] == first[1][0] == [str(store / os.path.basename(p)) for p in alone]
  names = sorted(n for n in os.listdir(store) if n.endswith((".record.json", ".npy")))
  assert [n for n in names if n.endswith(".record.json")] == sorted(
      os.path.basename(p) for p in alone)
  for name in names:
    assert (store / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
  assert cache.read_index(store) == cache.read_index(tmp_path / "alone")
  # Both hosts hold every skip, as one process does.
  assert (json.loads((store / "skips.json").read_text())
          == json.loads((tmp_path / "alone" / "skips.json").read_text()))

  again = build_on_two_processes(tmp_path / "data", store)
  assert [counts for _, counts in again] == [(0, wrote, n) for _, (wrote, _, n) in first]
  assert again[0][0] == first[0][0]


@pytest.fixture
def emulator(tmp_path):
  emu = gcs_emulator.Emulator(tmp_path / "gcs", "covid3d-records")
  yield emu
  emu.stop()


STAGE = ["--config=configs/segmentation.py:demo", "--config.data.phantom_scans=8",
         "--config.data.folds=1", "--config.data.workers=1", "--config.train.warmup_steps=0",
         "--config.train.num_steps=2", "--config.train.eval_every=2",
         "--config.train.checkpoint_every=2", "--config.train.progress_bar=False"]


def run_stage(tmp_path, emulator, name: str, processes: int, *flags: str) -> list[str]:
  """The segmentation stage on ``processes`` processes, 2 CPU devices in all; their outputs."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, **emulator.env(), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}
  dist = lambda pid: [] if processes == 1 else h.distributed_flags(port, processes, pid)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "covid3d.main", *STAGE, f"--workdir={tmp_path / name}",
       f"--config.data.phantom_dir={tmp_path / 'data'}",
       f"--config.cache_dir={tmp_path / f'{name}-cache{pid}'}", *dist(pid), *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for pid in range(processes)]
  texts = h.wait_all(procs, timeout=900)
  assert [p.returncode for p in procs] == [0] * processes, "\n".join(t[-3000:] for t in texts)
  return texts


def final_params(workdir) -> dict:
  ckpt = checkpoint.Checkpointer.open(f"{workdir}/checkpoints")
  step = ckpt.latest_step()
  leaves = {f"{ema}/{i}": np.asarray(leaf) for ema in (False, True)
            for i, leaf in enumerate(jax.tree.leaves(ckpt.restore_params(step, ema=ema)))}
  ckpt.close()
  return {"step": np.asarray(step), **leaves}


@pytest.mark.slow
def test_a_stage_on_two_processes_reads_one_store_and_trains_as_one_process(tmp_path, emulator):
  store = "gs://covid3d-records/store"
  single = run_stage(tmp_path, emulator, "single", 1)
  pair = run_stage(tmp_path, emulator, "pair", 2, f"--config.data.records_dir={store}")
  n = int(re.search(r"(\d+) scans: \1 preprocessed", single[0]).group(1))
  counts = [tuple(map(int, WROTE.search(text).groups()[1:])) for text in pair]
  assert sum(wrote for wrote, _, _ in counts) == n and all(found == 0 for _, found, _ in counts)
  records = [p for p in storage.list_names(f"{store}/lesions") if p.endswith(".record.json")]
  assert len(records) == n
  assert not os.path.exists(tmp_path / "pair-cache0" / "records")
  expect, got = final_params(tmp_path / "single"), final_params(tmp_path / "pair")
  assert expect.keys() == got.keys()
  for key in expect:
    np.testing.assert_array_equal(got[key], expect[key], err_msg=key)
