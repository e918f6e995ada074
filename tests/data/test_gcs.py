"""covid3d.storage against a real GCS emulator (fake-gcs-server on 127.0.0.1).

Files round-trip through a bucket, the variables tensorstore and gcsfs need
are derived from ``STORAGE_EMULATOR_HOST`` alone, and a checkpoint save to a
bucket that stops answering fails within its time limit. The stages'
workdirs in a bucket: tests/stages/test_pod_rehearsal.py.
"""
import os
import subprocess
import sys
import time

import pytest

import gcs_emulator
from covid3d import storage

BUCKET = "covid3d-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  emu = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs"), BUCKET)
  yield emu
  emu.stop()


def test_the_emulator_variable_is_the_only_one_needed():
  env = {storage.EMULATOR: "http://127.0.0.1:4443"}
  assert storage.use_emulator(env) == {"TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:4443",
                                       "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                                       "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  kept = {storage.EMULATOR: "127.0.0.1:4443", "TENSORSTORE_GCS_HTTP_URL": "http://other:1"}
  assert storage.use_emulator(kept)["TENSORSTORE_GCS_HTTP_URL"] == "http://other:1"
  assert storage.use_emulator({}) == {}


def test_files_round_trip_through_a_bucket(emulator):
  url = f"gs://{BUCKET}/files"
  storage.write_json(f"{url}/a/b.json", {"x": [1, 2]})
  assert storage.read_json(f"{url}/a/b.json") == {"x": [1, 2]}
  storage.write_text(f"{url}/t.csv", "a,b\r\n1,2\r\n")
  assert storage.text_lines(f"{url}/t.csv").read() == "a,b\r\n1,2\r\n"
  assert storage.as_path(url).joinpath("a", "b.json").exists()
  assert storage.is_remote(url) and not storage.is_remote("/tmp/x")


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
