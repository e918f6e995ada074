"""covid3d.storage against a real GCS emulator (fake-gcs-server on 127.0.0.1).

Files round-trip through a bucket, the variables tensorstore and gcsfs need
are derived from ``STORAGE_EMULATOR_HOST`` alone, and a checkpoint save to a
bucket that stops answering fails within its time limit. The stages'
workdirs in a bucket: tests/stages/test_pod_rehearsal.py.
"""
import os
import subprocess
import sys
import threading
import time

import fsspec
import pytest

import gcs_emulator
from covid3d import storage
from covid3d.train import log

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


class Relay(gcs_emulator.Gate):
  """A relay to the emulator that counts the bytes sent to it (requests: headers and
  bodies), and can cut an upload: after `cut` it passes on ``budget`` more bytes,
  then none, and closes the emulator's side when the client closes its own."""

  def __init__(self, port: int):
    self.sent, self.budget, self.lock = 0, None, threading.Lock()
    super().__init__(port)

  def cut(self, budget: int):
    with self.lock:
      self.budget = budget

  def _relay(self, src, dst):
    to_emulator = dst.getpeername()[1] == self.target
    try:
      while data := src.recv(65536):
        if to_emulator:
          with self.lock:
            if self.budget is not None:
              data, self.budget = data[:self.budget], self.budget - len(data[:self.budget])
            self.sent += len(data)
        if data:
          dst.sendall(data)
    except OSError:
      pass
    finally:
      dst.close()


# Logs rows through MetricLogger into argv[1] from step argv[2] + 1 on: argv[3:] are
# numbers of rows to write, each followed by a flush and a line on stdout, or "wait"
# (for a line on stdin).
LOG_ROWS = """
import sys
from covid3d.train import log
logger, step = log.MetricLogger(sys.argv[1], flush_every_s=float("inf")), int(sys.argv[2])
for arg in sys.argv[3:]:
  if arg == "wait":
    sys.stdin.readline()
    continue
  for _ in range(int(arg)):
    step += 1
    logger.write(step, "train", {"loss": 1 / step, "grad_norm": 2 / step, "learning_rate": 1e-4,
                                 "volumes_per_second": 12.5, "nonfinite_total": 0})
  logger.flush()
  print("flushed", step, flush=True)
logger.close()
"""


def _log_rows(emulator, relay, workdir, start, *args, wait=True):
  """Runs LOG_ROWS in a child process whose requests go through ``relay``."""
  env = {**os.environ, **emulator.env(), storage.EMULATOR: relay.url}
  for name in storage.use_emulator({storage.EMULATOR: emulator.url}):
    env.pop(name)  # derived again from the relay's address in the child
  proc = subprocess.Popen([sys.executable, "-c", LOG_ROWS, workdir, str(start),
                           *map(str, args)], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  if wait:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
  return proc


def _object_bytes(url: str) -> int:
  """The bytes of the objects under ``url`` (listed afresh)."""
  fs, root = fsspec.core.url_to_fs(url)
  fs.invalidate_cache()
  return sum(info["size"] for info in fs.find(root, detail=True).values())


def test_a_thousand_rows_on_a_bucket_upload_each_byte_once(emulator):
  """1,000 rows flushed every 50 (a checkpoint every 50 steps): the bytes sent to the
  bucket (all requests) stay within 3x what the bucket holds at the end."""
  relay = Relay(emulator.port)
  url = f"gs://{BUCKET}/logs/thousand"
  _log_rows(emulator, relay, url, 0, *[50] * 20)
  rows = log.read_metrics(url)
  assert [row["step"] for row in rows] == list(range(1, 1001))
  assert rows[1] == {"step": 2, "split": "train", "loss": 0.5, "grad_norm": 1.0,
                     "learning_rate": 1e-4, "volumes_per_second": 12.5, "nonfinite_total": 0}
  assert len(log.metric_parts(url)) == 20
  final = _object_bytes(url)
  print(f"1000 rows: {relay.sent} bytes sent, {final} bytes held at the end")
  assert relay.sent < 3 * final


def test_an_upload_cut_off_leaves_no_part_and_a_resumed_run_continues(emulator):
  relay = Relay(emulator.port)
  url = f"gs://{BUCKET}/logs/cut"
  proc = _log_rows(emulator, relay, url, 0, 20, 20, "wait", 500, wait=False)
  try:
    for step in (20, 40):
      assert proc.stdout.readline().split() == ["flushed", str(step)], proc.stderr.read()
    body = len("".join(p.read_text() for p in log.metric_parts(url))) // 40 * 500
    relay.cut(body // 2)  # the next part's upload stops within its body
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while relay.budget:
      assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
      time.sleep(0.05)
    time.sleep(0.5)
  finally:
    proc.kill()
    proc.wait()
  assert [row["step"] for row in log.read_metrics(url)] == list(range(1, 41))
  assert [p.name for p in log.metric_parts(url)] == [log.part_name(1), log.part_name(2)]
  # The run resumed from a checkpoint of step 40 writes the next part.
  _log_rows(emulator, Relay(emulator.port), url, 40, 10)
  assert [row["step"] for row in log.read_metrics(url)] == list(range(1, 51))
  assert log.metric_parts(url)[-1].name == log.part_name(3)
