"""Processes that would decide differently from their own files agree: process 0 decides.

Two JAX processes on 127.0.0.1, each with its own cache root whose
``dwconv_auto.json`` names a different backend for the same shape (as two
hosts whose homes hold different measurements), compile one program.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import portpicker

from covid3d import cachedir, storage
from covid3d.models import dwconv
from covid3d.stages import registry

X_SHAPE, K_SHAPE = (1, 8, 8, 8, 4), (3, 3, 3, 1, 4)

_PROCESS = textwrap.dedent("""
    import hashlib, json, sys
    import jax
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax.numpy as jnp
    from covid3d.models import dwconv
    x_shape, k_shape = json.loads(sys.argv[3])
    conv = jax.jit(lambda x, k: dwconv.depthwise_conv(x, k, impl="auto"))
    program = conv.lower(jnp.zeros(x_shape), jnp.zeros(k_shape)).as_text()
    print(json.dumps({"chosen": dwconv.decisions(),
                      "program": hashlib.sha256(program.encode()).hexdigest()}))
    """)


def plant(root, best: str) -> str:
  """A cache root whose table says ``best`` is fastest for X_SHAPE; the table's key."""
  key = dwconv._cache_key(X_SHAPE, K_SHAPE, "float32")  # pylint: disable=protected-access
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "dwconv_auto.json"), "w") as f:
    json.dump({key: {"best": best, "seconds": {}}}, f)
  return key


def test_two_processes_compile_process_0s_depthwise_choice(tmp_path):
  port = portpicker.pick_unused_port()
  procs = []
  for pid, best in ((0, "fft"), (1, "shift")):
    key = plant(tmp_path / f"host{pid}", best)
    env = {**os.environ, cachedir.ENV: str(tmp_path / f"host{pid}"), "JAX_PLATFORMS": "cpu"}
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _PROCESS, f"127.0.0.1:{port}", str(pid),
         json.dumps([X_SHAPE, K_SHAPE])], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r["chosen"] for r in results] == [{key: "fft"}, {key: "fft"}]
  assert results[0]["program"] == results[1]["program"]


def test_the_choice_is_recorded_in_config_json(tmp_path, monkeypatch):
  monkeypatch.setenv(cachedir.ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(dwconv, "_DECIDED", {})
  key = plant(tmp_path / "cache", "shift")
  saved = storage.write_json(tmp_path / "config.json", {"stage": "severity"})
  jax.jit(lambda x, k: dwconv.depthwise_conv(x, k, impl="auto")).lower(
      jax.ShapeDtypeStruct(X_SHAPE, "float32"), jax.ShapeDtypeStruct(K_SHAPE, "float32"))
  registry.record_dwconv_choices(saved)
  assert storage.read_json(saved) == {"stage": "severity", "dwconv_auto": {key: "shift"}}
