"""The benchmarks' plumbing: the GPU script parses, its commands parse, the PyTorch twin matches,
the host-memory benchmark measures every stage at a tiny size.

Nothing here runs the GPU script; the memory benchmark's and the depthwise check's tests time
something, at tiny sizes.
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.bench import __main__ as bench_main
from covid3d.bench import common
from covid3d.bench import memory as bench_memory
from covid3d.bench import model as bench_model
from covid3d.bench import train as bench_train
from covid3d.models import ConvNeXt, variant

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_CHECK = os.path.join(ROOT, "covid3d", "bench", "gpu_check.sh")


def _parser():
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers(dest="command", required=True)
  bench_model.register(sub)
  bench_train.register(sub)
  return parser


def _bench_commands():
  """The argument lists of every ``python -m covid3d.bench ...`` line of the script."""
  text = open(GPU_CHECK).read().replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    if line.lstrip().startswith("#"):
      continue
    m = re.search(r"python -m covid3d\.bench (.*)$", line)
    if m:
      commands.append(shlex.split(m.group(1).replace('"$out"', "out.md")))
  return commands


def test_gpu_check_is_valid_bash():
  subprocess.run(["bash", "-n", GPU_CHECK], check=True)
  text = open(GPU_CHECK).read()
  assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


def test_gpu_check_commands_parse():
  commands = _bench_commands()
  assert [c[0] for c in commands] == ["model", "model", "model", "train"]
  parser = _parser()
  parsed = [parser.parse_args(c) for c in commands]
  checks = [a for a in parsed if a.command == "model" and a.dwconv_check]
  assert {a.dtype for a in checks} == {"float32", "bfloat16"}
  assert all(a.dwconv_check == "1,56,56,56,96" and a.kernel_size == 7 for a in checks)
  assert all("pallas" in bench_model.parse_impls(a.impl, "gpu") for a in checks)
  (model,) = [a for a in parsed if a.command == "model" and not a.dwconv_check]
  assert (model.variant, model.size, model.impl, model.torch) == ("tiny", 224, "all", True)
  (train,) = [a for a in parsed if a.command == "train"]
  assert train.size == 224 and train.augment_only and train.markdown == "out.md"


@pytest.mark.parametrize("command", ["model", "train", "infer"])
def test_entry_points_answer_help(command, capsys):
  with pytest.raises(SystemExit) as done:
    bench_main.main([command, "--help"])
  assert done.value.code == 0
  out = capsys.readouterr().out
  for flag in {"model": ["--torch", "--dwconv-check", "--kernel-size", "--markdown", "--impl"],
               "train": ["--augment-only", "--markdown", "--size", "--impl"],
               "infer": ["--folds", "--no-torch", "--keep", "--markdown"]}[command]:
    assert flag in out


def test_impl_lists():
  assert "pallas" not in bench_model.parse_impls("all", "cpu")
  assert bench_model.parse_impls("all", "gpu")[-1] == "shift"
  assert "pallas" in bench_model.parse_impls("all", "gpu")
  assert bench_model.parse_impls("auto,fft", "cpu") == ("auto", "fft")
  with pytest.raises(SystemExit, match="unknown backend"):
    bench_model.parse_impls("cudnn", "cpu")


def test_markdown_is_one_table(tmp_path):
  path = str(tmp_path / "t.md")
  with open(path, "w") as f:
    f.write("GPU check (device: ...)\n\n")
  common.append_markdown(path, "a", [{"impl": "fft", "step_s": 0.5}], "impl")
  common.append_markdown(path, "b", [{"impl": "xla", "step_s": float("nan")}], "impl")
  lines = open(path).read().splitlines()
  assert lines.count(common.MARKDOWN_HEADER.splitlines()[0]) == 1
  assert lines[-2:] == ["| a | fft | step_s 0.5 |", "| b | xla | step_s - |"]


def test_random_params_have_the_model_shapes():
  model = ConvNeXt(**variant("nano"), num_classes=2, dwconv_impl="fft")
  x = jnp.zeros((1, 32, 32, 32, 1))
  params = common.random_params(model, x)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, shapes)
  assert float(params["stage0"]["block0"]["norm"]["scale"][0]) == 1.0


def test_compile_timed_reports_the_memory_plan():
  x = jnp.zeros((256, 256), jnp.float32)
  compiled, seconds, plan = common.compile_timed(jax.jit(lambda a: a @ a), x)
  assert seconds > 0 and plan >= 2 * x.nbytes   # argument and output at least
  np.testing.assert_array_equal(compiled(x), x)


def test_dwconv_check_passes_every_backend_against_lax(tmp_path):
  rows = bench_model.dwconv_check((1, 6, 5, 4, 3), 3, jnp.float32, ("xla", "fft", "shift"),
                                  reps=1, markdown=tmp_path / "out.md")
  assert [(r["impl"], r["check"]) for r in rows] == [("xla", "ok"), ("fft", "ok"), ("shift", "ok")]
  assert all(r["compile_s"] > 0 for r in rows)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torch_twin_has_the_same_parameters(spatial_dims):
  torch = pytest.importorskip("torch")
  net = bench_model.torch_convnext(torch, **variant("nano"), spatial_dims=spatial_dims)
  ours = jax.eval_shape(ConvNeXt(**variant("nano"), spatial_dims=spatial_dims, num_classes=2,
                                 dwconv_impl="fft").init,
                        jax.random.key(0), jnp.zeros((1,) + (32,) * spatial_dims + (1,)))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(ours))
  assert sum(p.numel() for p in net.parameters()) == count
  with torch.no_grad():
    out = net(torch.zeros((2, 1) + (32,) * spatial_dims))
  assert tuple(out.shape) == (2, 2)


def test_memory_benchmark_rows_and_one_stage(tmp_path):
  """A row's arithmetic on made-up measurements; then one stage measured at a tiny size."""
  got = {"base": 3 * 2 ** 20, "peak": 5 * 2 ** 20, "items": 10, "seconds": 4.0,
         "cpu_seconds": 5.0, "batch_bytes": 2.5e6}
  row = bench_memory._row("severity-train", "data", 7, "volumes/s", 1.5e6, got)  # pylint: disable=protected-access
  assert row == {"stage": "severity-train", "data": "data", "records": 7, "base_MiB": 3.0,
                 "peak_MiB": 5.0, "per_s": 2.5, "per_cpu_s": 2.0, "unit": "volumes/s",
                 "cache_MB": 1.5,
                 "batch_MB": 2.5}
  assert math.isnan(bench_memory._row("preprocess", "d", 1, "scans/s", 1.0,  # pylint: disable=protected-access
                                      dict(got, batch_bytes=float("nan")))["batch_MB"])
  assert set(bench_memory.TRAIN_ROWS) | {"floor"} <= set(bench_memory.STAGES)
  fields = {row: bench_memory.stage_fields(row, bench_memory.stage_config(row, (40, 32), 2, 2))
            for row in bench_memory.TRAIN_ROWS}
  assert fields["severity-train"] == {"image": "volume_32", "image_large": "volume_40",
                                      "label": "severity"}
  assert fields["segmentation-train"] == {"image": "volume_32", "image_large": "volume_40",
                                          "mask": "mask_32", "mask_large": "mask_40"}
  assert fields["multitask-train"] == dict(fields["segmentation-train"], stoic_covid="stoic_covid",
                                           stoic_severe="stoic_severe")
  out = tmp_path / "memory.json"
  bench_main.main(["memory", "--stages", "severity-train", "--sizes", "40,32", "--records", "4",
                   "--batch", "2", "--batches", "2", "--threads", "2", "--json", str(out)])
  floor, row = json.loads(out.read_text())["rows"]
  assert (floor["stage"], row["stage"], row["records"]) == ("floor", "severity-train", 4)
  for r in (floor, row):
    assert 0 < r["base_MiB"] <= r["peak_MiB"] and r["cache_MB"] > 0, r
    assert math.isfinite(r["per_s"]) and r["per_s"] > 0 and r["unit"] == "volumes/s", r
  # A floor item: uint8 32^3 + 40^3; a severity item: the same as float16, label, index, valid.
  assert floor["batch_MB"] == pytest.approx((32 ** 3 + 40 ** 3) / 1e6)
  assert row["batch_MB"] == pytest.approx(((32 ** 3 + 40 ** 3) * 2 + 9) / 1e6)
  assert row["cache_MB"] > (32 ** 3 + 40 ** 3) * 2 / 1e6


@pytest.mark.slow   # converts and compiles two nano folds (about 40 s of CPU)
def test_the_infer_benchmark_runs_the_same_ensemble_in_pytorch(tmp_path):
  """The authors'-style submission file that ``bench infer`` writes gives, through ``authors
  convert`` and covid3d, the probabilities PyTorch's twin gives from the same file."""
  pytest.importorskip("torch")
  from covid3d import authors, export
  from covid3d.bench import infer as bench_infer
  from covid3d.data import preprocess, readers, schema
  submission, model_dir, scan = tmp_path / "s.pt", tmp_path / "model", tmp_path / "scan.nii.gz"
  bench_infer.write_submission(submission, "nano", folds=2)
  authors.convert_submission(submission, model_dir, target="severity")
  config = json.loads((model_dir / "config.json").read_text())
  config["data"]["sizes"] = [32]
  config["model"]["dwconv_impl"] = "fft"
  (model_dir / "config.json").write_text(json.dumps(config))
  bench_infer.write_scan(scan, 32)
  theirs = bench_infer.torch_ensemble(submission, model_dir, scan)["probs"]
  predictor = export.workdir_predictor(*export.load_model(model_dir))
  cube = preprocess.preprocess_scan(readers.read_path(scan), (32,))[schema.volume_key(32)]
  ours = predictor.fn(np.asarray(cube, np.float32)[None, ..., None])[0]
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert np.ptp(ours) > 1e-3   # random folds that disagree, not a uniform answer
