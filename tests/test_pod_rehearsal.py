"""A pod run rehearsed on this machine: 2 JAX processes x 2 CPU devices, workdirs in a bucket.

Each stage runs as ``python -m covid3d.main`` in two processes joined by
``jax.distributed`` on 127.0.0.1, its workdir in a real GCS emulator's bucket
(the only variable given is ``STORAGE_EMULATOR_HOST``; the CPU device count is
the harness's stand-in for a host's chips). The chain pretrain2d ->
segmentation -> severity (2 folds), at demo sizes, runs twice from the same
2-D pretraining: once uninterrupted, and once with one process SIGKILLed in
the middle of segmentation (then both restarted, as a pod's job restarts
after a lost host) and SIGTERM sent to every process in the middle of
severity (a preemption: they save and exit; restarted, they continue). The
final parameters of every stage are equal bit for bit. Then the
pseudolabel stage (no training) and the report run on the same bucket, and
every output is found there, none in a local folder named ``gs:``.

``python -m pytest -q tests/test_pod_rehearsal.py`` runs it (docs/launch.md,
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
from covid3d import report, storage
from covid3d.train import checkpoint, log

pytestmark = pytest.mark.slow
BUCKET = "covid3d-pod"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
STEPS = 8
SMALL = ["--config.data.phantom_scans=8", "--config.data.folds=2", "--config.data.workers=1",
         "--config.train.warmup_steps=0", f"--config.train.num_steps={STEPS}",
         "--config.train.eval_every=4", "--config.train.checkpoint_every=2",
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
             *flags, "--config.train.distributed.initialize=True",
             f"--config.train.distributed.coordinator_address=127.0.0.1:{port}",
             f"--config.train.distributed.num_processes={PROCESSES}",
             f"--config.train.distributed.process_id={pid}",
             f"--config.cache_dir={root / f'host{pid}'}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

  def wait(self, timeout: float = 900) -> list[int]:
    return [proc.wait(timeout=timeout) for proc in self.procs]

  def tail(self) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

  def finish(self):
    assert self.wait() == [0] * PROCESSES, self.tail()
    assert epath.Path(self.workdir, "DONE").exists(), self.tail()

  def wait_for_checkpoint(self, subdir: str = "", step: int = 2, timeout: float = 900):
    """Returns once checkpoint ``step`` under ``<workdir>/<subdir>`` is complete on the bucket."""
    done = epath.Path(self.workdir, subdir, "checkpoints", str(step), "commit_success.txt")
    deadline = time.monotonic() + timeout
    while not done.exists():
      assert all(p.poll() is None for p in self.procs), f"a process ended early\n{self.tail()}"
      assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s\n{self.tail()}"
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


def test_a_pod_run_survives_a_lost_host_and_a_preemption(emulator, tmp_path):
  url = f"gs://{BUCKET}/rehearsal"
  stage = lambda name, workdir, *flags: Stage(tmp_path, emulator, name, workdir, *flags)
  stage("pretrain2d", f"{url}/pretrain2d", "--config.train.num_steps=2").finish()
  start = time.monotonic()
  for run in ("uninterrupted", "interrupted"):
    seg = f"{url}/{run}/segmentation"
    severity = f"{url}/{run}/severity"
    first = stage("segmentation", seg, f"--config.init_from={url}/pretrain2d")
    if run == "interrupted":
      first.wait_for_checkpoint()
      first.procs[1].send_signal(signal.SIGKILL)   # a host is lost ...
      first.procs[0].send_signal(signal.SIGKILL)   # ... and the pod's job with it
      first.wait()
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
      assert second.wait() == [128 + signal.SIGTERM] * PROCESSES, second.tail()
      assert not epath.Path(severity, "DONE").exists(), "severity ended before the SIGTERM"
      second = stage("severity", severity, f"--config.init_from={seg}")
      second.finish()
      assert "resumed from step" in second.logs[0].read_text()
    second.finish()
    print(f"{run} run: {time.monotonic() - start:.0f} s")
    start = time.monotonic()

  for workdir in ("segmentation", "severity/fold0", "severity/fold1"):
    expected = final_params(f"{url}/uninterrupted/{workdir}")
    got = final_params(f"{url}/interrupted/{workdir}")
    assert expected.keys() == got.keys() and expected["step"] == got["step"] == STEPS
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{workdir}: {key}")

  # The other outputs, on the bucket: a stage without training, the report.
  chain = epath.Path(f"{url}/interrupted")
  stage("pseudolabel", str(chain / "pseudolabel"),
        f"--config.init_from={chain / 'segmentation'}").finish()
  # Every scan once, whichever process read it.
  phantom = tmp_path / "data" / "cov19ctdb"
  scans = lambda partition: len(list((phantom / partition).glob("**/ct_scan_*")))
  labelled = storage.read_json(chain / "pseudolabel" / "DONE")["scans"]
  assert labelled["cov19ctdb"] == sum(scans(p) for p in ("train", "validation", "test"))
  for dataset, count in labelled.items():
    assert len(list(chain.glob(f"pseudolabel/masks/{dataset}/*.npz"))) == count > 0, dataset
    assert len(list(chain.glob(f"pseudolabel/nifti/{dataset}/*_pseudo.nii.gz"))) == count
  severity = chain / "severity"
  predicted = (severity / "predictions_validation.csv").read_text().splitlines()[1:]
  assert len(predicted) == scans("validation") > 0
  assert {"DONE", "config.json", "cv.json", "fold0", "fold1", "folds.csv", "skips.json",
          "log.0.txt", "log.1.txt"} <= {p.name for p in severity.iterdir()}
  assert "resumed from step" in (severity / "log.0.txt").read_text()
  assert {"DONE", "checkpoints", "metrics.jsonl"} <= {p.name
                                                      for p in (severity / "fold0").iterdir()}
  assert log.read_metrics(severity / "fold0"), "no metrics read back from the bucket"
  report.main([str(chain)])
  assert "severity" in (chain / "report.md").read_text() and (chain / "report.png").exists()
  assert not list(tmp_path.glob("**/gs:*")) and not os.path.exists(os.path.join(REPO, "gs:"))
