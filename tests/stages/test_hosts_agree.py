"""Processes that would decide differently from their own files agree: process 0 decides.

Two JAX processes on 127.0.0.1, each with its own cache root whose
``dwconv_auto.json`` names a different backend for the same shape (as two
hosts whose homes hold different measurements), compile one program.
The choice is made while the model is traced (inside ``shard_map`` under
``jit``, as in a train step).
"""
import json
import os
import subprocess
import sys
import textwrap

import portpicker

from covid3d import cachedir, storage
from covid3d.models import dwconv, dwconv_tune
from covid3d.stages import registry

X_SHAPE, K_SHAPE = (1, 8, 8, 8, 4), (3, 3, 3, 1, 4)

_PROCESS = textwrap.dedent("""
    import hashlib, json, sys
    import jax
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from covid3d.models import dwconv
    x_shape, k_shape = json.loads(sys.argv[3])
    # As in a train step: the convolution traced inside shard_map under jit.
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    conv = jax.jit(jax.shard_map(lambda x, k: dwconv.depthwise_conv(x, k, impl="auto"),
                                 mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
    program = conv.lower(
        jax.ShapeDtypeStruct((jax.device_count(),) + tuple(x_shape[1:]), jnp.float32,
                             sharding=NamedSharding(mesh, P("data"))),
        jax.ShapeDtypeStruct(k_shape, jnp.float32, sharding=NamedSharding(mesh, P()))).as_text()
    print(json.dumps({"chosen": dwconv.choose_impl(x_shape, k_shape),
                      "program": hashlib.sha256(program.encode()).hexdigest()}))
    """)


def plant(root, best: str, **others: str) -> str:
  """A cache root whose table says ``best`` is fastest for X_SHAPE (and holds the entries
  ``others``, key -> best); the table's key for X_SHAPE on this device."""
  key = dwconv_tune.cache_key(X_SHAPE, K_SHAPE, "float32", dwconv.auto_candidates())
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, dwconv_tune.TABLE), "w") as f:
    json.dump({k: {"best": b, "seconds": {}} for k, b in {key: best, **others}.items()}, f)
  return key


def test_two_processes_compile_process_0s_depthwise_choice(tmp_path):
  port = portpicker.pick_unused_port()
  procs = []
  for pid, best in ((0, "fft"), (1, "shift")):
    plant(tmp_path / f"host{pid}", best)
    env = {**os.environ, cachedir.ENV: str(tmp_path / f"host{pid}"), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _PROCESS, f"127.0.0.1:{port}", str(pid),
         json.dumps([X_SHAPE, K_SHAPE])], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r["chosen"] for r in results] == ["fft", "fft"]
  assert results[0]["program"] == results[1]["program"]


def test_the_choice_is_recorded_in_config_json(tmp_path, monkeypatch):
  monkeypatch.setenv(cachedir.ENV, str(tmp_path / "cache"))
  # Other devices' choices and choices among other candidates are not this run's.
  other_device = "gpu|NVIDIA H100|(1, 8, 8, 8, 4)|(3, 3, 3, 1, 4)|float32|xla,fft,shift,pallas"
  key = plant(tmp_path / "cache", "shift", **{other_device: "pallas",
                                              key_with_candidates("xla,fft"): "xla"})
  config = {"stage": "severity", "model": {"dwconv_impl": "auto"}}
  saved = storage.write_json(tmp_path / "config.json", config)
  registry.record_dwconv_choices(saved)
  assert storage.read_json(saved) == {**config, "dwconv_auto": {key: "shift"}}
  assert dwconv.choose_impl(X_SHAPE, K_SHAPE) == "shift"   # what auto uses: the recorded one


def test_nothing_is_recorded_without_auto(tmp_path, monkeypatch):
  monkeypatch.setenv(cachedir.ENV, str(tmp_path / "cache"))
  plant(tmp_path / "cache", "shift")
  config = {"stage": "severity", "model": {"dwconv_impl": "fft"}}
  saved = storage.write_json(tmp_path / "config.json", config)
  registry.record_dwconv_choices(saved)
  assert storage.read_json(saved) == config


def key_with_candidates(candidates: str) -> str:
  return dwconv_tune.cache_key(X_SHAPE, K_SHAPE, "float32", candidates.split(","))
