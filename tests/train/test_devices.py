"""1 device (2 micro-batches) and 8 simulated devices give the same training run."""
import json

import jax
import numpy as np
import pytest

import train_helpers as h
from covid3d.train import checkpoint


@pytest.mark.slow
def test_one_and_eight_devices_agree(tmp_path):
  procs = {devices: h.run_worker(h.worker_args(str(tmp_path / f"d{devices}"),
                                                str(tmp_path / f"d{devices}.npz"), num_steps=3,
                                                micro_batches=micro, checkpoint_every=100),
                                  devices=devices, wait=False)
           for devices, micro in ((1, 2), (8, 1))}  # run side by side
  runs = {}
  for devices, proc in procs.items():
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    runs[devices] = h.load_params(str(tmp_path / f"d{devices}.npz"))
  assert runs[1].keys() == runs[8].keys()
  for k in runs[1]:
    np.testing.assert_allclose(runs[8][k], runs[1][k], rtol=1e-4, atol=1e-6, err_msg=k)
  losses = [[json.loads(l)["loss"] for l in open(tmp_path / f"d{d}" / "metrics.jsonl")]
            for d in (1, 8)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  # The 8-device checkpoint restores here, on 1 device (a pod run read on one host).
  ckpt = checkpoint.Checkpointer.open(str(tmp_path / "d8" / "checkpoints"))
  for ema, key in ((False, "params"), (True, "ema")):
    restored = ckpt.restore_params(3, ema=ema)
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
      assert len(leaf.sharding.device_set) == 1
      np.testing.assert_array_equal(np.asarray(leaf),
                                    runs[8][f"['{key}']{jax.tree_util.keystr(path)}"])
