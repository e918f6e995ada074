"""Two JAX processes on 127.0.0.1 (2 CPU devices each) train like one process with 4."""
import json
import os
import subprocess
import sys

import numpy as np
import portpicker

import train_helpers as h


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  port = portpicker.pick_unused_port()
  common = dict(num_steps=2, checkpoint_every=2, eval_every=2)
  jobs = [(str(tmp_path / "multi"), f"p{pid}", dict(coordinator=f"127.0.0.1:{port}",
                                                     num_processes=2, process_id=pid), 2)
          for pid in (0, 1)] + [(str(tmp_path / "single"), "single", {}, 4)]
  procs = [h.run_worker(h.worker_args(work, str(tmp_path / f"{name}.npz"), **common, **dist),
                        devices=devices, wait=False)
           for work, name, dist, devices in jobs]  # all three side by side
  for proc, output in zip(procs, h.wait_all(procs), strict=True):
    assert proc.returncode == 0, output
  p0, p1 = (h.load_params(str(tmp_path / f"p{pid}.npz")) for pid in (0, 1))
  single = h.load_params(str(tmp_path / "single.npz"))
  h.assert_trees_equal(p0, p1)
  for k in single:
    np.testing.assert_allclose(p0[k], single[k], rtol=1e-5, atol=1e-7, err_msg=k)
  multi_eval = json.load(open(tmp_path / "p0.npz.json"))["eval"]
  single_eval = json.load(open(tmp_path / "single.npz.json"))["eval"]
  assert multi_eval.keys() == single_eval.keys()
  for k in single_eval:
    np.testing.assert_allclose(multi_eval[k], single_eval[k], rtol=1e-5, err_msg=k)
  assert (tmp_path / "multi" / "checkpoints" / "2" / "data" / "process_1-of-2.json").exists()
  assert not list((tmp_path / "multi").glob("tensorboard/*"))[1:]  # one writer: process 0


def test_a_failed_process_ends_the_stage_at_once(tmp_path):
  """Process 1 of ``covid3d.main`` fails (its workdir is a file): it exits with one line,
  without waiting for process 0, which JAX ends once it misses process 1's heartbeat."""
  port = portpicker.pick_unused_port()
  (tmp_path / "a_file").write_text("")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  logs = [tmp_path / f"{pid}.log" for pid in (0, 1)]
  procs = []
  for pid, log in enumerate(logs):
    with open(log, "w") as out:   # a file: a pipe stays open while an orphaned child lives
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "covid3d.main",
           f"--config={h.HERE}/../configs/pretrain2d.py:demo",
           f"--workdir={tmp_path / ('work' if pid == 0 else 'a_file')}",
           f"--config.data.phantom_dir={tmp_path / 'data'}", "--config.data.workers=1",
           f"--config.cache_dir={tmp_path / 'cache'}",
           *h.distributed_flags(port, 2, pid),
           "--config.train.distributed.heartbeat_timeout_s=10"],
          cwd=os.path.dirname(h.HERE), env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    codes = [proc.wait(timeout=120) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outputs = [log.read_text() for log in logs]
  assert codes[1] == 1, outputs[1]
  assert outputs[1].strip().splitlines()[-1].startswith(
      "covid3d.main: stage pretrain2d: process 1 of 2 failed (FileExistsError: "), outputs[1]
  assert codes[0] != 0 and ("another task died" in outputs[0] or "unhealthy" in outputs[0]), \
      outputs[0]
