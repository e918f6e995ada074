"""pseudolabel and predict split their scans across processes (``covid3d.stages.shards``).

Each scan is predicted once per pod, and the outputs of 2 real JAX processes
(``jax.distributed`` on 127.0.0.1, 2 CPU devices each) are byte-identical to
the 1-process run of the session chain: the pseudo-label masks (NPZ and NIfTI),
the prediction CSVs, the submission files and the metrics.
"""
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

import train_helpers as h
from conftest import SMALL
from covid3d.stages import shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROCESSES = 2


def test_the_shares_hold_every_record_once_in_whole_batches():
  for n, batch, count in ((40, 4, 2), (8, 4, 3), (9, 4, 2), (3, 4, 2), (0, 4, 2), (7, 1, 3)):
    shares = [shards.share(n, batch, p, count) for p in range(count)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(n))
    for p, mine in enumerate(shares):   # batch k of one process's reading goes to k mod count
      starts = mine[::batch]
      assert all(s % batch == 0 and (s // batch) % count == p for s in starts), (n, p, mine)
  index, rows = shards.gather(np.array([4, 0, 5, 1]), np.arange(4.0, dtype=np.float32), 6, 2)
  assert index.tolist() == [0, 1, 4, 5] and rows.tolist() == [1.0, 3.0, 0.0, 2.0]


def run_processes(stage: str, chain, workdir, init_from: str) -> list[str]:
  """``covid3d.main`` of ``configs/<stage>.py:demo`` (the chain's sizes) in ``PROCESSES``
  processes joined by jax.distributed; returns their logs."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  logs = [workdir.parent / f"{workdir.name}.{pid}.log" for pid in range(PROCESSES)]
  procs = []
  for pid, log in enumerate(logs):
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "covid3d.main", f"--config=configs/{stage}.py:demo",
           f"--workdir={workdir}", f"--config.data.phantom_dir={chain / 'data'}",
           f"--config.init_from={init_from}",
           *(f"--config.{k}={v}" for k, v in SMALL.items()),
           *h.distributed_flags(port, PROCESSES, pid)],
          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    codes = [proc.wait(timeout=900) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [0] * PROCESSES, "\n".join(t[-3000:] for t in texts)
  return texts


def files(root, *folders) -> dict:
  """relative path -> bytes of every file under ``root/<folder>`` (or the files named)."""
  out = {}
  for folder in folders:
    path = root / folder
    for f in sorted(path.rglob("*") if path.is_dir() else [path]):
      if f.is_file():
        out[str(f.relative_to(root))] = f.read_bytes()
  return out


@pytest.mark.slow
def test_two_processes_predict_each_scan_once_and_write_what_one_process_writes(chain, tmp_path):
  logs = run_processes("pseudolabel", chain, tmp_path / "pseudolabel", str(chain / "segmentation"))
  for pid, log in enumerate(logs):   # 40 COV19-CT-DB scans in 10 batches of 4: 5 each
    assert f"process {pid} of 2 predicts 20 of the 40 scans" in log, log[-3000:]
  expected = files(chain / "pseudolabel", "masks", "nifti")
  got = files(tmp_path / "pseudolabel", "masks", "nifti")
  assert len(expected) > 40 and got.keys() == expected.keys()
  assert [k for k in expected if got[k] != expected[k]] == []
  assert (tmp_path / "pseudolabel" / "DONE").read_text() == \
      (chain / "pseudolabel" / "DONE").read_text()

  logs = run_processes("predict", chain, tmp_path / "predict", str(chain / "severity"))
  for pid, log in enumerate(logs):   # 8 validation scans in 2 batches of 4: one each
    assert f"process {pid} of 2 predicts 4 of the 8 scans" in log, log[-3000:]
  outputs = ["predictions_validation.csv", "predictions_test.csv", "metrics_validation.json",
             "submission_validation", "submission_test"]
  expected, got = files(chain / "severity", *outputs), files(tmp_path / "predict", *outputs)
  assert len(expected) == 11 and got == expected
