"""Reading checkpoint files safely: torch pickles without a full unpickle, safetensors, npz.

A torch file is read with ``torch.load(weights_only=True)``: tensors plus the
plain data the authors' pickles hold (datetimes, paths, numpy scalars and
arrays), never arbitrary objects unless the caller passes ``trusted=True``.
``read_state_dict`` also takes the state dict out of a training checkpoint's
wrapper (EMA weights first) and drops a DataParallel ``module.`` prefix.
"""
import datetime
import os
import pathlib
from typing import Any, Dict, Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")  # .tar: the authors' pretrainings
# Every file type read_state_dict reads (what ``config.init_from`` accepts as a checkpoint file).
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# Wrappers of a state dict in a training/pretraining checkpoint: EMA weights, then raw ones.
EMA_WRAPPERS = ("model_ema", "model_ema_state_dict")
RAW_WRAPPERS = ("model", "model_state_dict", "state_dict")


def _as_numpy(name, value):
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"state dict entry {name!r} is not an array ({type(value).__name__})") from e


def _is_fold_list(value) -> bool:
  return isinstance(value, (list, tuple)) and bool(value) and all(
      isinstance(v, Mapping) for v in value)


def _unwrap(state: Mapping[str, Any], ema: bool = True) -> Mapping[str, Any]:
  """Takes the state dict out of a training checkpoint.

  ``ema=True`` takes ``model_ema`` / ``model_ema_state_dict`` when present, else
  ``model`` / ``model_state_dict`` / ``state_dict``; ``ema=False`` only the latter.
  A bare state dict is returned as it is.
  """
  order = EMA_WRAPPERS + RAW_WRAPPERS if ema else RAW_WRAPPERS
  for wrapper in EMA_WRAPPERS + RAW_WRAPPERS:
    if _is_fold_list(state.get(wrapper)):
      raise ValueError(
          f"the checkpoint's {wrapper!r} holds {len(state[wrapper])} state dicts, one per fold (a "
          f"wrapped-up submission file of Kienzle et al.): read it with "
          f"covid3d.weights.load_authors_checkpoint, or convert it with `python -m covid3d.authors "
          f"convert`")
  for wrapper in order:
    if isinstance(state.get(wrapper), Mapping):
      return state[wrapper]
  if not ema and any(isinstance(state.get(w), Mapping) for w in EMA_WRAPPERS):
    raise ValueError(f"ema=False, but the checkpoint holds only EMA weights "
                     f"({[w for w in EMA_WRAPPERS if w in state]}); use ema=True")
  return state


def _safe_globals():
  """What the authors' pickles hold besides tensors: datetimes, paths, numpy scalars/arrays.

  Their training checkpoints store their config (``created`` is a datetime,
  paths may be ``pathlib`` objects) and metrics (numpy scalars); allowing
  these plain-data types lets ``torch.load(weights_only=True)`` read them.
  """
  allowed = [datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
             datetime.timezone, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
             pathlib.PureWindowsPath, np.ndarray, np.dtype]
  core = getattr(np, "_core", None) or np.core
  for name in ("scalar", "_reconstruct"):
    fn = getattr(core.multiarray, name)
    # Files pickled with numpy 1.x name numpy.core, numpy 2.x numpy._core.
    allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
  dtypes = getattr(np, "dtypes", None)
  if dtypes is not None:
    classes = [getattr(dtypes, n) for n in dir(dtypes)]
    allowed += [c for c in classes if isinstance(c, type) and issubclass(c, np.dtype)]
  return allowed


def _torch_load(path: str, trusted: bool = False):
  """``torch.load`` of a .pth/.pt/... file: weights only (plus plain data), or all if trusted."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs PyTorch: `pip install covid3d[torch]` (or torch), or "
        f"convert the checkpoint to .safetensors or .npz") from e
  if trusted:
    return torch.load(path, map_location="cpu", weights_only=False)
  try:
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: tensors only
      return torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals(_safe_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    unsafe = ""
    try:
      unsafe = f" (it pickles {torch.serialization.get_unsafe_globals_in_checkpoint(path)})"
    except Exception:  # pylint: disable=broad-except
      pass
    raise ValueError(
        f"could not read {path!r} with torch.load(weights_only=True){unsafe}: {e}. If you trust "
        f"the file, load it yourself with torch.load and pass its state dict (or pass "
        f"trusted=True to load_authors_checkpoint)") from e


def read_checkpoint(source, *, trusted: bool = False):
  """The object a checkpoint file stores (e.g. a training checkpoint's whole dict).

  Args:
    source: a path (.pth/.pt/.bin/.ckpt or no suffix: read with torch,
      ``weights_only=True`` with plain data allowed: datetimes, paths, numpy
      scalars and arrays; .safetensors; .npz) or an already loaded mapping
      (returned as it is).
    trusted: read a torch file with ``weights_only=False`` (any pickle: only
      for files you trust).
  """
  return _read_object(source, trusted)[0]


def _read_object(source, trusted: bool = False):
  """The object stored in ``source`` (a path or a mapping), and a name for messages."""
  if isinstance(source, Mapping):
    return source, "the given mapping"
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(path), path
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, path
  if suffix in TORCH_SUFFIXES or not suffix:  # the authors' det2..det5 have no suffix
    return _torch_load(path, trusted), path
  raise ValueError(f"{path!r}: unknown checkpoint type {suffix!r}; expected one of "
                   f"{list(CHECKPOINT_SUFFIXES)}")


def _strip_module(state: Mapping[str, Any]) -> Mapping[str, Any]:
  if state and all(k.startswith("module.") for k in state):
    return {k[len("module."):]: v for k, v in state.items()}
  return state



def read_state_dict(source, ema: bool = True) -> Dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict as ``name -> numpy array``.

  Args:
    source: a path to ``.pth``/``.pt``/``.bin``/``.ckpt`` (needs torch; read
      with ``weights_only=True``, plain data such as datetimes, paths and
      numpy scalars allowed), ``.safetensors`` or ``.npz``; or a mapping
      name -> array (numpy, jax or torch tensors). A training checkpoint that
      wraps the weights (``model_ema``, ``model_ema_state_dict``, ``model``,
      ``model_state_dict``, ``state_dict``) is unwrapped, and a ``module.``
      prefix on every key (DataParallel) is removed.
    ema: take the EMA weights (``model_ema*``) of a checkpoint that has them,
      else the raw ones; False: only the raw ones.

  Returns:
    Dict name -> numpy array (floating tensors as float32 when from torch).
  """
  state, where = _read_object(source)
  if not isinstance(state, Mapping):
    raise ValueError(f"{where} holds a {type(state).__name__}, not a state dict")
  state = _strip_module(_unwrap(state, ema))
  return {k: _as_numpy(k, v) for k, v in state.items()}
