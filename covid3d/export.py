"""Exports a trained fold ensemble as one self-contained file.

  python -m covid3d.export --model=R/severity_segmia --out=severity.covid3d [--overwrite]

``--out`` must be a new file (``--overwrite`` replaces one, never through a
link, and never a file inside the model's workdir); it is written whole under a
temporary name beside it, then renamed.

The file is a zip archive:

* ``model.stablehlo``: ``jax.export`` serialisation of ``probs = f(params, x)``,
  the mean softmax of the folds; ``x`` float32 ``(B, s, s, s, 1)`` in [0, 1]
  (any batch size B), ``probs`` float32 ``(B, K)``; the normalisation is inside.
* ``params.npz``: the folds' weights, ``p00000``, ``p00001``, ... in the order
  of ``f``'s first argument (a flat tuple).
* ``meta.json``: ``format``, ``classes`` (K names), ``input_size`` s, and the
  preprocessing to apply first (``preprocess``: HU window, slice-image scaling,
  resampling), ``folds`` and the workdir it came from.

Running it needs JAX alone, not covid3d::

  import json, zipfile, numpy as np, jax
  z = zipfile.ZipFile("severity.covid3d")
  f = jax.export.deserialize(bytearray(z.read("model.stablehlo")))
  params = np.load(z.open("params.npz"))
  leaves = tuple(params[k] for k in sorted(params.files))
  probs = f.call(leaves, x)   # x: float32 (B, s, s, s, 1) preprocessed as meta.json says

``python -m covid3d.infer --model=severity.covid3d SCAN ...`` reads such a file
too.
"""
import argparse
import dataclasses
import io
import json
import os
import sys
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from covid3d import storage
from covid3d.data import preprocess
from covid3d.data.read_common import HU_WINDOW
from covid3d.inference import workdir
from covid3d.inference.ensemble import Ensemble, ensemble_fn, load_ensemble

FORMAT = "covid3d-ensemble-1"
PROG = "python -m covid3d.export"


@dataclasses.dataclass(frozen=True)
class Predictor:
  """Mean-softmax probabilities of a fold ensemble: ``fn(x)`` on float32 (B, s, s, s, 1);
  ``fold_fn(x)`` each fold's (F, B, K), or None (an exported file holds the mean alone)."""
  fn: Callable
  names: tuple
  input_size: int
  folds: tuple
  fold_fn: Callable | None = None


def load_model(model_dir) -> tuple[ml_collections.ConfigDict, Ensemble]:
  """(the workdir's saved config, its fold ensemble); reads the workdir, writes nothing.

  Raises:
    HandOffError: not a finished severity or detection workdir.
  """
  info = workdir.stage_info(model_dir)
  if info.get("stage") not in workdir.PREDICTED:
    raise workdir.HandOffError(
        f"{model_dir} ran the stage {info.get('stage')!r}: --model must be a finished "
        f"{' or '.join(workdir.PREDICTED)} workdir")
  config = ml_collections.ConfigDict(info)
  return config, load_ensemble(config, model_dir)


def workdir_predictor(config, ensemble) -> Predictor:
  """The ensemble of a fine-tuning workdir as a Predictor (jit-compiled; ``fn`` is the mean
  of ``fold_fn``)."""
  f, leaves = ensemble_fn(config, ensemble, per_fold=True)
  forward = jax.jit(f)

  def fold_fn(x):
    return np.asarray(forward(leaves, jnp.asarray(x)))
  return Predictor(lambda x: fold_fn(x).mean(axis=0), ensemble.names, min(config.data.sizes),
                   ensemble.folds, fold_fn)


def export(config, ensemble, model_dir) -> bytes:
  """The zip archive (module doc) of ``ensemble``, as bytes."""
  f, leaves = ensemble_fn(config, ensemble)
  return pack(f, leaves, min(config.data.sizes), ensemble.names, ensemble.folds, model_dir)


def pack(f, leaves, size: int, names, folds, source) -> bytes:
  """The zip archive (module doc) of ``probs = f(leaves, x)``, as bytes.

  ``f`` maps the flat weights ``leaves`` and float32 ``x`` (B, size, size, size, 1)
  in [0, 1] to float32 probabilities (B, len(names)); ``folds`` and ``source``
  (the workdir) are recorded in ``meta.json``.
  """
  batch = jax.export.symbolic_shape("b")[0]
  x_spec = jax.ShapeDtypeStruct((batch, size, size, size, 1), jnp.float32)
  leaf_specs = tuple(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves)
  exported = jax.export.export(jax.jit(f))(leaf_specs, x_spec)
  meta = {"format": FORMAT, "classes": list(names), "input_size": size,
          "folds": list(folds), "source": str(source),
          "preprocess": {"hu_window": list(HU_WINDOW), "slice_images": "value / 255",
                         "resample": "cubic spline to the cube, clipped to [0, 1]",
                         "settings": preprocess.settings((size,))}}
  params = io.BytesIO()
  np.savez(params, **{f"p{i:05d}": leaf for i, leaf in enumerate(leaves)})
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("meta.json", json.dumps(meta, indent=1))
    z.writestr("model.stablehlo", bytes(exported.serialize()))
    z.writestr("params.npz", params.getvalue())
  return out.getvalue()


def check_out(out, model, overwrite: bool) -> None:
  """Refuses an ``--out`` that would harm a file: one that exists (unless ``overwrite``), a
  link, a folder, or a file inside the ``model`` workdir (which export only reads).

  Raises:
    HandOffError: the one-line reason, naming ``out``.
  """
  if storage.is_remote(out):
    if storage.as_path(out).exists() and not overwrite:
      raise workdir.HandOffError(f"--out {out} exists: give a new file, or --overwrite")
    return
  try:
    storage.refuse_link(out)
  except storage.LinkRefused as e:
    raise workdir.HandOffError(f"--out {e}") from None
  if os.path.isdir(out):
    raise workdir.HandOffError(f"--out {out} is a folder: give the file to write")
  if os.path.exists(out) and not overwrite:
    raise workdir.HandOffError(f"--out {out} exists: give a new file, or --overwrite to "
                               "replace it")
  model = os.path.realpath(model)
  if os.path.commonpath([model, os.path.realpath(out)]) == model:
    raise workdir.HandOffError(f"--out {out} is inside the model {model}, which export only "
                               "reads: write the file elsewhere")


def load(path) -> Predictor:
  """A Predictor from an exported file.

  Raises:
    ValueError: not a covid3d export (or another format version).
  """
  try:
    z = zipfile.ZipFile(path)
    meta = json.loads(z.read("meta.json"))
  except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a covid3d export ({type(e).__name__}: {e})") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, this covid3d reads {FORMAT!r}")
  f = jax.export.deserialize(bytearray(z.read("model.stablehlo")))
  with z.open("params.npz") as p:
    params = np.load(p)
    leaves = tuple(params[k] for k in sorted(params.files))
  return Predictor(lambda x: np.asarray(f.call(leaves, jnp.asarray(x, jnp.float32))),
                   tuple(meta["classes"]), int(meta["input_size"]), tuple(meta["folds"]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a finished severity or detection workdir")
  parser.add_argument("--out", required=True, help="the file to write (a new one)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it exists (never through a link)")
  args = parser.parse_args(argv)
  try:
    check_out(args.out, args.model, args.overwrite)
    config, ensemble = load_model(args.model)
  except workdir.HandOffError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  data = export(config, ensemble, args.model)
  try:
    storage.write_bytes(args.out, data)
  except storage.LinkRefused as e:
    print(f"{PROG}: --out {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"{PROG}: --out {args.out}: {e.strerror or e}", file=sys.stderr)
    return 2
  print(f"{args.out}: {len(ensemble.folds)} fold model(s), {', '.join(ensemble.names)}; "
        f"{len(data) / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
