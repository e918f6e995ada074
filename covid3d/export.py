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
* ``MODEL_CARD.md``: the workdir's model card (``covid3d.model_card``): its
  training data, intended use, inputs and cross-validation figures.

Running it needs JAX alone, not covid3d::

  import json, zipfile, numpy as np, jax
  z = zipfile.ZipFile("severity.covid3d")
  f = jax.export.deserialize(bytearray(z.read("model.stablehlo")))
  params = np.load(z.open("params.npz"))
  leaves = tuple(params[k] for k in sorted(params.files))
  probs = f.call(leaves, x)   # x: float32 (B, s, s, s, 1) preprocessed as meta.json says

``python -m covid3d.infer --model=severity.covid3d SCAN ...`` reads such a file
too. `load` refuses, in one line naming the file, a file that is no such zip,
lacks a member, holds wrong types, or whose members declare more bytes than
``MAX_BYTES`` allows or expand more than ``MAX_EXPANSION`` times (a zip bomb),
before it reads them.
"""
import argparse
import dataclasses
import io
import json
import logging
import math
import os
import sys
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from covid3d import model_card, storage
from covid3d.data import preprocess
from covid3d.data.read_common import HU_WINDOW
from covid3d.inference import workdir
from covid3d.inference.ensemble import Ensemble, ensemble_fn, load_ensemble
from covid3d.models import dwconv_tune

FORMAT = "covid3d-ensemble-1"
PROG = "python -m covid3d.export"
# The most bytes each member may expand to: the weights of a 5-fold ConvNeXt-L are 4 GiB.
MAX_BYTES = {"meta.json": 2**20, model_card.FILE: 2**20, "model.stablehlo": 2**30,
             "params.npz": 8 * 2**30}
MAX_EXPANSION = 50   # declared / compressed bytes of a member over 1 MiB (weights: about 1.1)


@dataclasses.dataclass(frozen=True)
class Predictor:
  """Mean-softmax probabilities of a fold ensemble: ``fn(x)`` on float32 (B, s, s, s, 1);
  ``fold_fn(x)`` each fold's (F, B, K), or None (an exported file holds the mean alone)."""
  fn: Callable
  names: tuple
  input_size: int
  folds: tuple
  fold_fn: Callable | None = None
  card: str = ""   # MODEL_CARD.md ('' for a workdir: covid3d.model_card.for_workdir)


def cli_logging() -> None:
  """Logging for a command line: warnings as bare lines on stderr (``force``: replacing what
  a library, absl, set up on import, INFO lines and all), the depthwise tuning's lines
  (`dwconv_tune`, INFO), and none of gcsfs's tracebacks of its retries (the error that ends
  them is said in one line)."""
  logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
  logging.getLogger(dwconv_tune.__name__).setLevel(logging.INFO)
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


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


# What reading a model that is not one raises (a bad config.json, a checkpoint that is
# missing or torn, a bucket that does not answer), said in one line by `unreadable`.
MODEL_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError, storage.StorageTimeout)


def unreadable(model, e: Exception, flag: str = "--model") -> str:
  """The one line that says why ``model`` (given as ``flag``) could not be read (``e``: one
  of MODEL_ERRORS; a HandOffError says it itself)."""
  if isinstance(e, workdir.HandOffError):
    return str(e)
  reason = (str(e).strip().splitlines() or [""])[0][:300]
  return f"{flag} {model}: cannot be read ({type(e).__name__}{': ' + reason if reason else ''})"


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
  return pack(f, leaves, min(config.data.sizes), ensemble.names, ensemble.folds, model_dir,
              model_card.for_workdir(model_dir))


def pack(f, leaves, size: int, names, folds, source, card: str) -> bytes:
  """The zip archive (module doc) of ``probs = f(leaves, x)``, as bytes.

  ``f`` maps the flat weights ``leaves`` and float32 ``x`` (B, size, size, size, 1)
  in [0, 1] to float32 probabilities (B, len(names)); ``folds`` and ``source``
  (the workdir) are recorded in ``meta.json``, ``card`` is ``MODEL_CARD.md``.
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
    z.writestr(model_card.FILE, card)
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
    ValueError: not a covid3d export (or another format version, or a member too
      large, missing or of the wrong kind), in one line naming ``path``.
  """
  try:
    with zipfile.ZipFile(path) as z:
      meta, leaves, exported, card = _read_members(z)
  except ExportError as e:
    raise ValueError(f"{path}: {e}") from None
  except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
    raise ValueError(f"{path}: not a covid3d export ({type(e).__name__}: {e})") from None
  return Predictor(lambda x: np.asarray(exported.call(leaves, jnp.asarray(x, jnp.float32))),
                   tuple(meta["classes"]), meta["input_size"], tuple(meta["folds"]), card=card)


class ExportError(ValueError):
  """What is wrong inside an export file (one line, without the file's name)."""


def _member(z: zipfile.ZipFile, name: str) -> bytes:
  """Member ``name`` of ``z``, its declared sizes checked before it is read."""
  try:
    info = z.getinfo(name)
  except KeyError:
    raise ExportError(f"not a covid3d export: no {name} in the zip") from None
  _check_size(info, MAX_BYTES[name], name)
  return z.read(info)


def _check_size(info: zipfile.ZipInfo, limit: int, where: str) -> None:
  if info.file_size > limit:
    raise ExportError(f"{where} declares {info.file_size} bytes, more than the {limit} an "
                      "export holds")
  if info.file_size > 2**20 and info.file_size > MAX_EXPANSION * max(info.compress_size, 1):
    raise ExportError(f"{where} expands {info.file_size / max(info.compress_size, 1):.0f} "
                      f"times ({info.compress_size} to {info.file_size} bytes): not weights, a "
                      "zip bomb")


def _read_members(z: zipfile.ZipFile):
  """(meta, leaves, the deserialised function, the card) of an export's zip, checked."""
  try:
    meta = json.loads(_member(z, "meta.json"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"meta.json is not JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise ExportError(f"format {found!r}, this covid3d reads {FORMAT!r}")
  kinds = {"classes": list, "input_size": int, "folds": list}
  wrong = [f"{k} ({type(meta.get(k)).__name__}, not {t.__name__})" for k, t in kinds.items()
           if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
  if wrong or not all(isinstance(c, str) for c in meta["classes"]) or meta["input_size"] < 1:
    raise ExportError(f"meta.json holds wrong types: {', '.join(wrong) or 'classes or size'}")
  leaves = _read_params(_member(z, "params.npz"))
  try:
    exported = jax.export.deserialize(bytearray(_member(z, "model.stablehlo")))
  except Exception as e:  # pylint: disable=broad-except  # flatbuffers raises anything
    raise ExportError(f"model.stablehlo is not a serialised JAX function ({type(e).__name__})"
                      ) from None
  shapes = [tuple(a.shape) for a in exported.in_avals]
  if shapes[:-1] != [leaf.shape for leaf in leaves] or len(shapes) != len(leaves) + 1:
    raise ExportError(f"params.npz ({len(leaves)} arrays) does not fit model.stablehlo "
                      f"({len(shapes)} arguments)")
  if tuple(exported.out_avals[0].shape[1:]) != (len(meta["classes"]),):
    raise ExportError(f"model.stablehlo gives {exported.out_avals[0].shape[1:]} outputs for "
                      f"{len(meta['classes'])} classes")
  card = (_member(z, model_card.FILE).decode("utf-8", "replace")
          if model_card.FILE in z.namelist() else "")
  return meta, leaves, exported, card


def _read_params(data: bytes) -> tuple:
  """The arrays of ``params.npz`` in name order; each member's declared size and each
  array's header checked before it is read; no pickled objects."""
  fmt = np.lib.format
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as npz:
      infos = sorted(npz.infolist(), key=lambda i: i.filename)
      for info in infos:
        _check_size(info, MAX_BYTES["params.npz"], f"params.npz/{info.filename}")
        with npz.open(info) as f:
          header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                    else fmt.read_array_header_2_0)
          shape, _, dtype = header(f)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
          raise ExportError(f"params.npz/{info.filename} is not an array of numbers that "
                            "fits its size")
      return tuple(fmt.read_array(npz.open(info), allow_pickle=False) for info in infos)
  except ExportError:
    raise
  except (zipfile.BadZipFile, ValueError, EOFError) as e:
    raise ExportError(f"params.npz is not a numpy .npz of arrays ({e})") from None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a finished severity or detection workdir")
  parser.add_argument("--out", required=True, help="the file to write (a new one)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it exists (never through a link)")
  args = parser.parse_args(argv)
  cli_logging()
  try:
    check_out(args.out, args.model, args.overwrite)
  except workdir.HandOffError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  try:
    config, ensemble = load_model(args.model)
  except MODEL_ERRORS as e:
    print(f"{PROG}: {unreadable(args.model, e)}", file=sys.stderr)
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
