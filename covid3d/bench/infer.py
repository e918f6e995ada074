"""``python -m covid3d.bench infer``: the whole ``covid3d.infer`` call beside PyTorch.

It builds a fold ensemble of random ConvNeXt classifiers (``--variant``, 4
classes, the authors' pre-head), saves it as the authors' submission file
(``{'config', 'model_ema': [one state dict per fold]}``, official PyTorch
naming), converts it with ``python -m covid3d.authors convert`` and writes one
phantom chest CT of ``--size``^3 voxels (NIfTI). Then, each in a process of its
own, timed from its start to its end:

* ``python -m covid3d.infer`` with an empty cache root (``COVID3D_CACHE_DIR``):
  the first use, which times the depthwise backends (``dwconv_impl=auto``); the
  seconds that took are summed from the ``tuning_s`` of each new entry of
  ``dwconv_auto.json`` (``covid3d.models.dwconv_tune``);
* the same call again (the table remembered, everything compiled anew);
* PyTorch (``torch_convnext``) running the same fold models on the same scan,
  read and preprocessed by covid3d's readers as infer does, weights from the
  same submission file, ``torch.no_grad``.

The rows say the wall time of each, the 1-minute load average at its end, and
the largest difference between the two frameworks' probabilities. ``--keep DIR``
keeps the files (else a temporary folder); ``--markdown FILE`` appends the rows
to one table (``common.append_markdown``).
"""
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from covid3d.bench.common import append_markdown, print_table

NAMES = ("mild", "moderate", "severe", "critical")


def register(subparsers):
  p = subparsers.add_parser("infer", help="the whole covid3d.infer call on one scan, beside "
                                          "PyTorch running the same ensemble")
  p.add_argument("--variant", default="tiny")
  p.add_argument("--folds", type=int, default=5)
  p.add_argument("--size", type=int, default=224, help="the model's cube edge and the scan's")
  p.add_argument("--no-torch", action="store_true", help="time covid3d.infer only")
  p.add_argument("--keep", default=None, metavar="DIR", help="write the files here and keep them")
  p.add_argument("--markdown", default=None, metavar="FILE",
                 help="append the rows to this markdown table")
  p.set_defaults(func=run)


def write_submission(path, variant_name: str, folds: int, seed: int = 0) -> None:
  """An authors'-style submission file of ``folds`` random ConvNeXt severity classifiers."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from covid3d.bench.common import random_params  # pylint: disable=import-outside-toplevel
  from covid3d.models import ConvNeXt, variant  # pylint: disable=import-outside-toplevel
  from covid3d.weights.to_torch import export_torch_convnext  # pylint: disable=import-outside-toplevel
  spec = variant(variant_name)
  model = ConvNeXt(**spec, num_classes=len(NAMES), head_hidden=spec["dims"][-1])
  x = jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32)   # shapes do not depend on the size
  states = []
  for fold in range(folds):
    params = random_params(model, x, seed=seed + fold)
    states.append({k: torch.from_numpy(np.array(v)) for k, v in
                   export_torch_convnext(params).items()})
  config = {"modelconfig": {"loss_fn": "balce_sev_eccv", "num_classes": len(NAMES),
                            "size": variant_name, "in_chan": 1}}
  torch.save({"config": config, "model_ema": states}, path)


def write_scan(path, size: int) -> None:
  """A phantom chest CT of ``size``^3 voxels (int16 HU) as NIfTI."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel

  from covid3d.data import phantom  # pylint: disable=import-outside-toplevel
  hu, _, info = phantom.make_scan(0, kind="covid", severity=2, shape=(size,) * 3)
  image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
  image.SetSpacing(info["spacing"][::-1])
  sitk.WriteImage(image, str(path))


def timed(cmd, env=None) -> tuple[float, str]:
  """``(wall seconds, stdout)`` of a command that must succeed."""
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")
  return seconds, proc.stdout


def torch_ensemble(submission, model_dir, scan) -> dict:
  """PyTorch's mean softmax of the submission's folds on ``scan`` (as ``covid3d.infer``
  preprocesses it): ``{'probs', 'threads'}``. Run by ``python -m covid3d.bench.infer``."""
  import torch  # pylint: disable=import-outside-toplevel

  from covid3d.bench.model import torch_convnext  # pylint: disable=import-outside-toplevel
  from covid3d.data import preprocess, readers, schema  # pylint: disable=import-outside-toplevel
  config = json.loads((Path(model_dir) / "config.json").read_text())
  size = min(config["data"]["sizes"])
  record = preprocess.preprocess_scan(readers.read_path(scan), (size,))
  cube = np.asarray(record[schema.volume_key(size)], np.float32)
  x = torch.from_numpy((cube - config["data"]["mean"]) / config["data"]["std"])[None, None]
  states = torch.load(submission, map_location="cpu", weights_only=True)["model_ema"]
  probs = []
  with torch.no_grad():
    for state in states:
      spec = _variant_of(state)
      net = torch_convnext(torch, **spec, num_classes=len(NAMES),
                           head_hidden=state["pre_head.weight"].shape[0]).eval()
      net.load_state_dict(twin_state(state, spec["depths"]))
      probs.append(torch.softmax(net(x), dim=-1)[0].numpy())
  return {"probs": np.mean(probs, axis=0).tolist(), "threads": torch.get_num_threads()}


def twin_state(state, depths) -> dict:
  """An official-naming ConvNeXt state dict (with the authors' ``pre_head``) renamed for
  ``covid3d.bench.model.torch_convnext``, whose layers sit in one ``features`` list."""
  names = {"norm": "norm", "pre_head": "pre_head.0", "head": "head"}
  index = 0
  for i, depth in enumerate(depths):
    names[f"downsample_layers.{i}.0"] = (f"features.{index}" if i == 0
                                         else f"features.{index}.norm")
    names[f"downsample_layers.{i}.1"] = (f"features.{index + 1}.norm" if i == 0
                                         else f"features.{index + 1}")
    index += 2
    for j in range(depth):
      names[f"stages.{i}.{j}"] = f"features.{index}"
      index += 1
  renamed = {}
  for key, value in state.items():
    prefix = max((p for p in names if key.startswith(p + ".")), key=len)
    renamed[names[prefix] + key[len(prefix):]] = value
  return renamed


def _variant_of(state) -> dict:
  """``depths`` and ``dims`` of an official-naming ConvNeXt state dict."""
  depths = [1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"stages.{i}."))
            for i in range(4)]
  dims = [int(state[f"stages.{i}.0.dwconv.weight"].shape[0]) for i in range(4)]
  return {"depths": depths, "dims": dims}


def run(args):
  work = Path(args.keep or tempfile.mkdtemp(prefix="covid3d-bench-infer-"))
  work.mkdir(parents=True, exist_ok=True)
  submission, model_dir, scan = work / "submission.pt", work / "model", work / "scan.nii.gz"
  write_submission(submission, args.variant, args.folds)
  timed([sys.executable, "-m", "covid3d.authors", "convert", str(submission), str(model_dir),
         "--target", "severity"])
  config = json.loads((model_dir / "config.json").read_text())
  config["data"]["sizes"] = [args.size]
  (model_dir / "config.json").write_text(json.dumps(config, indent=2))
  write_scan(scan, args.size)
  print(f"{args.folds}-fold ConvNeXt-{args.variant} at {args.size}^3 in {work}; "
        f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
  cache = work / "cache"
  env = {**os.environ, "COVID3D_CACHE_DIR": str(cache)}
  blank = {"tuning_s": float("nan"), "chosen": "-", "max_prob_diff": float("nan")}
  rows, jax_probs = [], None
  for attempt in ("first", "second"):
    out = work / f"out_{attempt}"
    seconds, _ = timed([sys.executable, "-m", "covid3d.infer", f"--model={model_dir}",
                        f"--out={out}", "--overwrite", str(scan)], env)
    with open(out / "predictions.csv", newline="") as f:
      jax_probs = np.array([float(v) for v in map(next(csv.DictReader(f)).get, NAMES)])
    row = {"what": f"covid3d.infer, {attempt} call", "wall_s": seconds,
           "load_avg": os.getloadavg()[0], **blank}
    if attempt == "first":
      table = json.loads((cache / "dwconv_auto.json").read_text())
      row["tuning_s"] = sum(e.get("tuning_s", 0.0) for e in table.values())
      row["chosen"] = "/".join(e["best"] for e in table.values())
    rows.append(row)
  if not args.no_torch:
    seconds, stdout = timed([sys.executable, "-m", "covid3d.bench.infer", str(submission),
                             str(model_dir), str(scan)])
    result = json.loads(stdout.strip().splitlines()[-1])
    rows.append({"what": f"PyTorch, {result['threads']} threads", "wall_s": seconds,
                 "load_avg": os.getloadavg()[0], **blank,
                 "max_prob_diff": float(np.max(np.abs(np.array(result["probs"]) - jax_probs)))})
  print_table(rows)
  append_markdown(args.markdown, f"infer {args.folds}x{args.variant} {args.size}^3", rows, "what")


if __name__ == "__main__":
  print(json.dumps(torch_ensemble(*sys.argv[1:4])))
