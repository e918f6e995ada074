"""Every stage with its workdir in a bucket of a real GCS emulator (fake-gcs-server).

The chain pretrain2d -> segmentation -> pseudolabel -> severity runs with gs://
workdirs, hands on by gs:// URL, resumes on a rerun, writes the report to the
bucket, and writes nothing into a local folder named ``gs:``.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

import gcs_emulator
from covid3d import report, storage
from covid3d.stages import registry
from covid3d.train import log
from test_stages import tiny

pytestmark = pytest.mark.slow
BUCKET = "covid3d-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  emu = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs"), BUCKET)
  yield emu
  emu.stop()


def test_the_chain_runs_in_a_bucket(emulator, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # a relative "gs:" folder would appear here
  url = f"gs://{BUCKET}/chain"
  def run(name, **overrides):
    registry.run(tiny(name, tmp_path, **overrides), f"{url}/{name}")
    return epath.Path(f"{url}/{name}")
  pretrain = run("pretrain2d")
  assert {"DONE", "config.json", "checkpoints", "metrics.jsonl"} <= names(pretrain)
  run("segmentation", init_from=f"{url}/pretrain2d")
  pseudo = run("pseudolabel", init_from=f"{url}/segmentation")
  assert (pseudo / "DONE").exists() and list(pseudo.glob("nifti/*/*_pseudo.nii.gz"))
  assert list(pseudo.glob("masks/*/*.npz"))
  severity = run("severity", init_from=f"{url}/segmentation")
  assert {"DONE", "config.json", "cv.json", "fold0", "fold1", "folds.csv"} <= names(severity)
  assert {"DONE", "checkpoints", "metrics.jsonl"} <= names(severity / "fold0")
  assert log.read_metrics(severity / "fold0"), "no metrics read back from the bucket"
  cv = storage.read_json(severity / "cv.json")

  # A rerun finds every fold finished and changes nothing.
  before = (severity / "fold0" / "DONE").read_text()
  run("severity", init_from=f"{url}/segmentation")
  assert (severity / "fold0" / "DONE").read_text() == before
  assert storage.read_json(severity / "cv.json") == cv

  report.main([url])
  assert "severity" in (epath.Path(url) / "report.md").read_text()
  assert not list(tmp_path.glob("**/gs:*")) and not list(Path.cwd().glob("gs:*"))


def names(path: epath.Path) -> set[str]:
  return {p.name for p in path.iterdir()}


# Saves step 1, waits for a line on stdin, then saves step 2: exits 3 on a timeout.
SAVE_TWICE = """
import os, sys, time
import jax.numpy as jnp, ml_collections
from covid3d import storage
from covid3d.train.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1], keep=2, best_metric=None, timeout_s=float(sys.argv[2]))
state, config = {"w": jnp.ones((64, 64))}, ml_collections.ConfigDict({"a": 1})
ck.save(1, state, {}, config)
ck.wait()
print("saved", flush=True)
sys.stdin.readline()
start = time.monotonic()
try:
  ck.save(2, state, {}, config)
  ck.wait()
except storage.StorageTimeout as e:
  try:
    ck.wait()
  except storage.StorageTimeout:
    print(f"{time.monotonic() - start:.1f} s: {e}", flush=True)
    os._exit(3)
"""


def test_a_save_to_a_bucket_that_hangs_fails_in_bounded_time(emulator, tmp_path):
  gate = gcs_emulator.Gate(emulator.port)
  env = {**os.environ, **emulator.env(), storage.EMULATOR: gate.url,
         "FSSPEC_GCS": '{"requests_timeout": 5}'}
  for name in storage.use_emulator({storage.EMULATOR: emulator.url}):
    env.pop(name)   # derived again from the gate's address in the child
  proc = subprocess.Popen([sys.executable, "-c", SAVE_TWICE, f"gs://{BUCKET}/hang/ckpt", "3"],
                          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "saved", proc.stderr.read()
    gate.hang()
    start = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 3, err[-2000:]
  assert "storage did not answer within 3 s" in out and "save_timeout_s" in out
  assert time.monotonic() - start < 60
