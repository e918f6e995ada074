"""A pod run rehearsed on this machine: 2 JAX processes x 2 CPU devices, workdirs in a bucket.

Each stage runs as ``python -m covid3d.main`` in two processes joined by
``jax.distributed`` on 127.0.0.1, its workdir in a real GCS emulator's bucket
(the only variable given is ``STORAGE_EMULATOR_HOST``; the CPU device count is
the harness's stand-in for a host's chips). The chain pretrain2d ->
segmentation -> severity (one fold), at demo sizes, runs twice from the same
2-D pretraining: once uninterrupted, and once with one process SIGKILLed in
the middle of segmentation (then both restarted, as a pod's job restarts
after a lost host) and SIGTERM sent to every process in the middle of
severity (a preemption: they save and exit; restarted, they continue). The
final parameters of every stage are equal bit for bit. Then the report runs
on the same bucket, and every output is found there, none in a local folder
named ``gs:``. (The stages without training read and write their workdirs
through the same ``covid3d.storage``: tests/stages/test_chain.py runs them locally.)

A process that fails ends the stage at once: the harness kills its sibling
and shows the failed one's log.

``python -m pytest -q tests/stages/test_pod_rehearsal.py`` runs it (docs/launch.md,
"Rehearsing a pod on one machine").
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from etils import epath

import gcs_emulator
import train_helpers as h
from covid3d import report
from covid3d.train import checkpoint, log

pytestmark = pytest.mark.slow
BUCKET = "covid3d-pod"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROCESSES = 2
STEPS = 6
SMALL = ["--config.data.phantom_scans=8", "--config.data.folds=1", "--config.data.workers=1",
         "--config.train.warmup_steps=0", f"--config.train.num_steps={STEPS}",
         f"--config.train.eval_every={STEPS}", "--config.train.checkpoint_every=2",
         "--config.train.progress_bar=False"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  emu = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs"), BUCKET)
  yield emu
  emu.stop()


class Stage:
  """One stage's processes, started together as the hosts of a pod.

  Each process has its own cache root (a host's disk) and log file.
  """

  def __init__(self, root, emulator, name: str, workdir: str, *flags: str):
    self.name, self.workdir = name, workdir
    port = portpicker.pick_unused_port()
    env = {**os.environ, **emulator.env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    self.logs, self.procs = [], []
    for pid in range(PROCESSES):
      log = root / f"{len(list(root.glob('*.log'))):02d}.{name}.{pid}.log"
      self.logs.append(log)
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "covid3d.main", f"--config=configs/{name}.py:demo",
             f"--workdir={workdir}", f"--config.data.phantom_dir={root / 'data'}", *SMALL,
             *flags, *h.distributed_flags(port, PROCESSES, pid),
             f"--config.cache_dir={root / f'host{pid}'}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

  def wait(self, expect: int = 0, timeout: float = 900):
    """Waits until every process has exited with ``expect``.

    The first to exit otherwise fails the test at once, its sibling killed.
    """
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      self._check(expect)
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"{self.name}: still running after {timeout} s\n{self.tail()}")
      time.sleep(0.2)
    self._check(expect)

  def _check(self, expect: int | None):
    """Fails (killing the others) if a process has exited other than with ``expect``."""
    for pid, proc in enumerate(self.procs):
      if proc.poll() is not None and proc.returncode != expect:
        self.kill()
        pytest.fail(f"{self.name}: process {pid} exited with {proc.returncode}"
                    f"{'' if expect is None else f' (expected {expect})'}\n{self.tail()}")

  def kill(self):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()

  def tail(self) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

  def finish(self):
    self.wait()
    assert epath.Path(self.workdir, "DONE").exists(), self.tail()

  def wait_for_checkpoint(self, subdir: str = "", step: int = 2, timeout: float = 900):
    """Returns once checkpoint ``step`` under ``<workdir>/<subdir>`` is complete on the bucket."""
    done = epath.Path(self.workdir, subdir, "checkpoints", str(step), "commit_success.txt")
    deadline = time.monotonic() + timeout
    while not done.exists():
      self._check(None)   # no process may end before
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"{self.name}: no checkpoint {step} after {timeout} s\n{self.tail()}")
      time.sleep(0.2)


def final_params(workdir: str) -> dict:
  """The latest checkpoint's parameters and EMA parameters, as numpy arrays."""
  ckpt = checkpoint.Checkpointer.open(f"{workdir}/checkpoints")
  step = ckpt.latest_step()
  out = {f"{kind}/{jax_path}": np.asarray(leaf)
         for kind, ema in (("params", False), ("ema", True))
         for jax_path, leaf in _flat(ckpt.restore_params(step, ema=ema))}
  ckpt.close()
  return {"step": step, **out}


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flat(value, f"{prefix}/{key}")
  else:
    yield prefix, tree


@pytest.fixture
def stage(emulator, tmp_path):
  """Starts a stage's processes; kills those still running when the test ends."""
  started = []

  def start(name: str, workdir: str, *flags: str) -> Stage:
    started.append(Stage(tmp_path, emulator, name, workdir, *flags))
    return started[-1]

  yield start
  for one in started:
    one.kill()


def test_a_pod_run_survives_a_lost_host_and_a_preemption(stage, tmp_path):
  url = f"gs://{BUCKET}/rehearsal"
  stage("pretrain2d", f"{url}/pretrain2d", "--config.train.num_steps=2").finish()
  start = time.monotonic()
  for run in ("uninterrupted", "interrupted"):
    seg = f"{url}/{run}/segmentation"
    severity = f"{url}/{run}/severity"
    first = stage("segmentation", seg, f"--config.init_from={url}/pretrain2d")
    if run == "interrupted":
      first.wait_for_checkpoint()
      first.procs[1].kill()   # a host is lost ...
      first.kill()            # ... and the pod's job with it
      assert not epath.Path(seg, "DONE").exists(), "segmentation ended before the kill"
      first = stage("segmentation", seg, f"--config.init_from={url}/pretrain2d")
      first.finish()
      assert "resumed from step" in first.logs[0].read_text()
    first.finish()
    second = stage("severity", severity, f"--config.init_from={seg}")
    if run == "interrupted":
      second.wait_for_checkpoint("fold0")
      for proc in second.procs:
        proc.send_signal(signal.SIGTERM)
      second.wait(expect=128 + signal.SIGTERM)
      assert not epath.Path(severity, "DONE").exists(), "severity ended before the SIGTERM"
      second = stage("severity", severity, f"--config.init_from={seg}")
      second.finish()
      assert "resumed from step" in second.logs[0].read_text()
    second.finish()
    print(f"{run} run: {time.monotonic() - start:.0f} s")
    start = time.monotonic()

  for workdir in ("segmentation", "severity/fold0"):
    expected = final_params(f"{url}/uninterrupted/{workdir}")
    got = final_params(f"{url}/interrupted/{workdir}")
    assert expected.keys() == got.keys() and expected["step"] == got["step"] == STEPS
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{workdir}: {key}")

  # The other outputs, on the bucket.
  chain = epath.Path(f"{url}/interrupted")
  phantom = tmp_path / "data" / "cov19ctdb"
  severity = chain / "severity"
  predicted = (severity / "predictions_validation.csv").read_text().splitlines()[1:]
  assert len(predicted) == len(list((phantom / "validation").glob("**/ct_scan_*"))) > 0
  assert {"DONE", "config.json", "cv.json", "fold0", "skips.json",
          "log.0.txt", "log.1.txt"} <= {p.name for p in severity.iterdir()}
  assert "resumed from step" in (severity / "log.0.txt").read_text()
  assert {"DONE", "checkpoints", "metrics.jsonl.d"} <= {p.name
                                                        for p in (severity / "fold0").iterdir()}
  assert log.read_metrics(severity / "fold0"), "no metrics read back from the bucket"
  report.main([str(chain)])
  assert "severity" in (chain / "report.md").read_text() and (chain / "report.png").exists()
  assert not list(tmp_path.glob("**/gs:*")) and not os.path.exists(os.path.join(REPO, "gs:"))
