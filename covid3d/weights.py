"""Import (and export) PyTorch ConvNeXt weights for ``covid3d.models.ConvNeXt``.

Two PyTorch namings are understood, detected from the keys:

* ``official`` (facebookresearch/ConvNeXt, and the authors' 3-D code):
  ``downsample_layers.0.{0,1}`` stem conv + LayerNorm,
  ``downsample_layers.i.{0,1}`` LayerNorm + conv, ``stages.i.j.{dwconv, norm,
  pwconv1, pwconv2, gamma}``, ``norm``, ``pre_head`` (the authors' extra
  Linear), ``head``.
* ``timm``: ``stem.{0,1}``, ``stages.i.downsample.{0,1}``,
  ``stages.i.blocks.j.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``,
  ``head.norm``, ``head.pre_logits.fc``, ``head.fc``.

Layouts: a torch conv weight ``(out, in, *k)`` becomes a flax kernel
``(*k, in, out)`` (3-D: torch ``(kD, kH, kW)`` -> flax ``(kD, kH, kW)``; the
depthwise ``(C, 1, *k)`` becomes ``(*k, 1, C)``); a Linear ``(out, in)``
becomes ``(in, out)``; LayerNorm ``weight``/``bias`` become ``scale``/``bias``.

The authors' own files (Kienzle et al., PyTorch) are read by
``load_authors_checkpoint``: their pretraining files (``{'epoch',
'model_state_dict', ...}``), training checkpoints (``{'model', 'model_ema',
...}``) and wrapped-up submission files (``{'config', 'data_transforms',
'model_ema': [one state dict per fold]}``), with the keys of their ConvNeXt
(``main_model.*``), UperNeXt and MultiNeXt (``encoder.main_model.*``,
``decoder.upsample_blocks.*``, ``decoder.segmentation_head.*``). The result is
the parameter tree of a ``covid3d.models.MultitaskModel``
(``multitask_config`` gives its arguments). ``slice_axis='last'`` maps weights
trained on slice-last volumes (their NIfTI and STOIC pretraining readers) to
the project's (slice, row, column) volumes by permuting the 3-D kernels.
"""
import dataclasses
import datetime
import os
import pathlib
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

NAMINGS = {
    "official": dict(
        stem_conv="downsample_layers.0.0", stem_norm="downsample_layers.0.1",
        down_norm="downsample_layers.{i}.0", down_conv="downsample_layers.{i}.1",
        block="stages.{i}.{j}", dwconv="dwconv", pwconv1="pwconv1", pwconv2="pwconv2",
        head_norm="norm", pre_head="pre_head", fc="head"),
    "timm": dict(
        stem_conv="stem.0", stem_norm="stem.1",
        down_norm="stages.{i}.downsample.0", down_conv="stages.{i}.downsample.1",
        block="stages.{i}.blocks.{j}", dwconv="conv_dw", pwconv1="mlp.fc1", pwconv2="mlp.fc2",
        head_norm="head.norm", pre_head="head.pre_logits.fc", fc="head.fc"),
}
STEM_PATCH, DOWN_PATCH, DW_KERNEL = 4, 2, 7
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")  # .tar: the authors' pretrainings
# Every file type read_state_dict reads (what ``config.init_from`` accepts as a checkpoint file).
CHECKPOINT_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# Wrappers of a state dict in a training/pretraining checkpoint: EMA weights, then raw ones.
EMA_WRAPPERS = ("model_ema", "model_ema_state_dict")
RAW_WRAPPERS = ("model", "model_state_dict", "state_dict")
# Key prefixes of the authors' models: UperNeXt/MultiNeXt encoder, and their ConvNeXt3dSTOIC.
AUTHORS_PREFIXES = ("encoder.main_model.", "main_model.")
# Their age/sex layers (unused without metadata, as in their COV19-CT-DB models).
AUTHORS_METADATA = ("metadata_prehead.", "metadata_embedding.")
# MultiNeXt's MosMed and HUST heads (unused by their recipe), dropped on import.
MULTINEXT_EXTRA = ("norm_mos.", "pre_head_mos.", "head_mos.", "norm_hust.", "pre_head_hust.",
                   "head_hust.", "metadata_prehead_hust.")
# slice_axis names -> the permutation ``p`` with covid3d volume = their volume.transpose(p).
SLICE_AXES = {"first": (0, 1, 2), "last": (2, 1, 0)}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: its flax path, torch key, layout kind and torch shape."""
  flax_path: Tuple[str, ...]
  torch_key: str
  kind: str  # 'conv', 'linear' or 'vec'
  torch_shape: Tuple[int, ...]


def _layout(naming, depths, dims, in_chans, spatial_dims, num_classes, head_hidden, has_gamma):
  """Every parameter of ``ConvNeXt(...)`` with its torch name and torch shape."""
  n = NAMINGS[naming]
  entries: List[_Entry] = []

  def conv(path, key, out, inp, k):
    shape = (out, inp) + (k,) * spatial_dims
    entries.append(_Entry(path + ("kernel",), key + ".weight", "conv", shape))
    entries.append(_Entry(path + ("bias",), key + ".bias", "vec", (out,)))

  def norm(path, key, c):
    entries.append(_Entry(path + ("scale",), key + ".weight", "vec", (c,)))
    entries.append(_Entry(path + ("bias",), key + ".bias", "vec", (c,)))

  def linear(path, key, out, inp):
    entries.append(_Entry(path + ("kernel",), key + ".weight", "linear", (out, inp)))
    entries.append(_Entry(path + ("bias",), key + ".bias", "vec", (out,)))

  for i, (depth, c) in enumerate(zip(depths, dims, strict=False)):
    if i == 0:
      conv(("stem", "conv"), n["stem_conv"], c, in_chans, STEM_PATCH)
      norm(("stem", "norm"), n["stem_norm"], c)
    else:
      norm((f"down{i}", "norm"), n["down_norm"].format(i=i), dims[i - 1])
      conv((f"down{i}", "conv"), n["down_conv"].format(i=i), c, dims[i - 1], DOWN_PATCH)
    for j in range(depth):
      path, key = (f"stage{i}", f"block{j}"), n["block"].format(i=i, j=j)
      conv(path + ("dwconv",), f"{key}.{n['dwconv']}", c, 1, DW_KERNEL)
      norm(path + ("norm",), f"{key}.norm", c)
      linear(path + ("pwconv1",), f"{key}.{n['pwconv1']}", 4 * c, c)
      linear(path + ("pwconv2",), f"{key}.{n['pwconv2']}", c, 4 * c)
      if has_gamma:
        entries.append(_Entry(path + ("gamma",), f"{key}.gamma", "vec", (c,)))
  if num_classes is not None:
    norm(("head", "norm"), n["head_norm"], dims[-1])
    width = dims[-1]
    if head_hidden:
      linear(("head", "pre_head"), n["pre_head"], head_hidden, width)
      width = head_hidden
    linear(("head", "fc"), n["fc"], num_classes, width)
  return entries


def _to_flax(kind, a):
  if kind == "conv":
    return np.transpose(a, tuple(range(2, a.ndim)) + (1, 0))
  return a.T if kind == "linear" else a


def _to_torch(kind, a):
  if kind == "conv":
    return np.transpose(a, (a.ndim - 1, a.ndim - 2) + tuple(range(a.ndim - 2)))
  return a.T if kind == "linear" else a


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


def split_authors_state(state: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any],
                                                           Dict[str, Any]]:
  """Splits a state dict of the authors' models into (ConvNeXt, decoder, other) parts.

  ``encoder.main_model.*`` (UperNeXt, MultiNeXt) or ``main_model.*``
  (ConvNeXt3dSTOIC) keys become the ConvNeXt part without the prefix;
  ``decoder.*`` keys the decoder part without ``decoder.``; everything else,
  and the ConvNeXt's age/sex ``metadata_*`` layers, the other part. A state
  dict without these prefixes is all ConvNeXt (official or timm keys).
  """
  state = _strip_module(state)
  for prefix in AUTHORS_PREFIXES:
    if any(k.startswith(prefix) for k in state):
      convnext, decoder, other = {}, {}, {}
      for k, v in state.items():
        if k.startswith(prefix):
          name = k[len(prefix):]
          (other if name.startswith(AUTHORS_METADATA) else convnext)[name] = v
        elif k.startswith("decoder."):
          decoder[k[len("decoder."):]] = v
        else:
          other[k] = v
      return convnext, decoder, other
  return dict(state), {}, {}


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


def detect_naming(keys) -> str:
  """'official' or 'timm', from the state dict's key names."""
  keys = list(keys)
  if any(k.startswith("downsample_layers.") for k in keys):
    return "official"
  if any(k.startswith("stem.") for k in keys) or any(".blocks." in k for k in keys):
    return "timm"
  raise ValueError("cannot tell the ConvNeXt naming: no 'downsample_layers.*' (official) nor "
                   f"'stem.*' (timm) keys; first keys: {keys[:8]}")


def _block_regex(naming):
  block = re.escape(NAMINGS[naming]["block"])
  block = block.replace(r"\{i\}", r"(\d+)").replace(r"\{j\}", r"(\d+)")
  return re.compile("^" + block + r"\.")


def _infer_backbone(state, naming, problems):
  """Depths, dims, in_chans, spatial dims and layer scale from the keys and shapes."""
  n = NAMINGS[naming]
  regex = _block_regex(naming)
  blocks: Dict[int, int] = {}
  width: Dict[int, int] = {}
  has_gamma = False
  for key, value in state.items():
    m = regex.match(key)
    if not m:
      continue
    i, j = int(m.group(1)), int(m.group(2))
    blocks[i] = max(blocks.get(i, 0), j + 1)
    rest = key[m.end():]
    has_gamma |= rest == "gamma"
    if rest in ("norm.weight", "norm.bias", f"{n['dwconv']}.bias", "gamma") and value.ndim == 1:
      width.setdefault(i, value.shape[0])
  if not blocks:
    raise ValueError(f"no ConvNeXt blocks ({n['block'].format(i='i', j='j')}.*) in the state dict")
  num_stages = max(blocks) + 1
  depths = tuple(blocks.get(i, 0) for i in range(num_stages))
  for i in range(num_stages):
    if i not in width:
      problems.append(f"cannot tell the width of stage {i} (no block norm/bias/gamma keys)")
  dims = tuple(width.get(i, 0) for i in range(num_stages))
  stem = state.get(n["stem_conv"] + ".weight")
  in_chans = stem.shape[1] if stem is not None and stem.ndim > 2 else 1
  ckpt_dims = stem.ndim - 2 if stem is not None else None
  return depths, dims, in_chans, ckpt_dims, has_gamma


def _is_head_key(key, naming):
  n = NAMINGS[naming]
  return any(key.startswith(n[part] + ".") for part in ("head_norm", "pre_head", "fc"))


def load_torch_convnext(source, spatial_dims: int, *, num_classes: Optional[int] = None,
                        head_hidden: Optional[int] = None, in_chans: Optional[int] = 1,
                        ignore: Sequence[str] = (), ema: bool = True,
                        slice_axis="first") -> Dict[str, Any]:
  """Params for ``covid3d.models.ConvNeXt`` from a PyTorch ConvNeXt state dict.

  Depths, widths and the layer-scale setting are read from the checkpoint;
  ``convnext_config(params)`` returns the matching ``ConvNeXt`` arguments.

  Args:
    source: path (.pth/.pt/.bin/.ckpt with torch, .safetensors, .npz) or a
      mapping name -> array; see ``read_state_dict``. Official or timm naming.
    spatial_dims: 2 or 3; must match the checkpoint's convolutions (inflate a
      2-D checkpoint with ``covid3d.inflation`` to get 3-D weights).
    num_classes: None loads the backbone only (the checkpoint's final norm and
      head are skipped); an int also loads ``head/norm`` and ``head/fc``,
      which must have that many outputs.
    head_hidden: width of the authors' extra ``pre_head`` Linear (with
      ``num_classes``); None for the official head.
    in_chans: 1 (default) folds an RGB stem to one gray channel by summing
      the stem kernel over its input channels, so a gray image ``g`` gives the
      response the RGB model gives to ``(g, g, g)``; None keeps the
      checkpoint's channels; another int must equal the checkpoint's.
    ignore: key prefixes to drop before matching (e.g. ``('metadata_',)``
      for the metadata layers of a bare state dict of the authors' STOIC model).
    ema: a checkpoint with EMA and raw weights gives its EMA weights (False:
      the raw ones); see ``read_state_dict``.
    slice_axis: ``'first'`` (default) keeps the kernels; ``'last'`` maps 3-D
      weights trained on slice-last volumes (``(column, row, slice)``, as
      nibabel and medpy read them) to the project's ``(slice, row, column)``
      by reversing the kernels' spatial axes; or a permutation ``p`` of
      ``(0, 1, 2)`` with project volume = their volume ``.transpose(p)``.

  The authors' key prefixes are understood: ``main_model.`` (their
  ConvNeXt3dSTOIC) and ``encoder.main_model.`` (UperNeXt, MultiNeXt; the
  decoder and extra heads are skipped); their age/sex ``metadata_*`` layers
  are then dropped.

  Returns:
    Nested dict of float32 numpy arrays, the ``'params'`` collection:
    ``model.apply({'params': params}, x)``.

  Raises:
    ValueError: listing, in one message, every missing, unexpected and
      mis-shaped key.
  """
  if spatial_dims not in (2, 3):
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
  state, _, _ = split_authors_state(read_state_dict(source, ema))
  state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
  naming = detect_naming(state)
  problems: List[str] = []
  depths, dims, ckpt_in, ckpt_dims, has_gamma = _infer_backbone(state, naming, problems)
  if ckpt_dims is not None and ckpt_dims != spatial_dims:
    problems.append(f"the checkpoint's stem conv has {ckpt_dims} spatial axes but spatial_dims="
                    f"{spatial_dims} (inflate 2-D weights with covid3d.inflation)")
  if in_chans is not None and in_chans != ckpt_in and in_chans != 1:
    problems.append(f"in_chans={in_chans} but the checkpoint's stem has {ckpt_in} input channels")
  entries = _layout(naming, depths, dims, ckpt_in, spatial_dims, num_classes, head_hidden,
                    has_gamma)
  expected = {e.torch_key: e for e in entries}
  skipped = {k for k in state if num_classes is None and _is_head_key(k, naming)}
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected) - skipped)
  misshaped = sorted(f"{k}: {tuple(state[k].shape)}, expected {expected[k].torch_shape}"
                     for k in set(expected) & set(state)
                     if tuple(state[k].shape) != expected[k].torch_shape)
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("mis-shaped keys", misshaped)):
    if items:
      problems.append(f"{title} ({len(items)}): " + ", ".join(items))
  if problems:
    raise ValueError(
        f"PyTorch ConvNeXt state dict ({naming} naming, depths {depths}, dims {dims}) does not "
        f"match ConvNeXt(spatial_dims={spatial_dims}, num_classes={num_classes}, "
        f"head_hidden={head_hidden}):\n  " + "\n  ".join(problems))

  params: Dict[str, Any] = {}
  for e in entries:
    value = state[e.torch_key].astype(np.float32)
    if e.flax_path == ("stem", "conv", "kernel") and in_chans == 1 and ckpt_in != 1:
      value = value.sum(axis=1, keepdims=True)
    node = params
    for part in e.flax_path[:-1]:
      node = node.setdefault(part, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(_to_flax(e.kind, value))
  return permute_kernels(params, slice_axis)


def _axes(slice_axis) -> Tuple[int, int, int]:
  if isinstance(slice_axis, str):
    if slice_axis not in SLICE_AXES:
      raise ValueError(f"slice_axis must be one of {sorted(SLICE_AXES)} or a permutation of "
                       f"(0, 1, 2); got {slice_axis!r}")
    return SLICE_AXES[slice_axis]
  axes = tuple(int(a) for a in slice_axis)
  if sorted(axes) != [0, 1, 2]:
    raise ValueError(f"slice_axis permutation must be a permutation of (0, 1, 2); got {slice_axis}")
  return axes


def permute_kernels(params, slice_axis="last"):
  """Permutes the spatial axes of every 3-D conv kernel ``(kD, kH, kW, in, out)`` of a tree.

  Weights trained on volumes ``v`` serve volumes ``v.transpose(p)`` with the
  same outputs (spatial outputs transposed the same way) when every 3-D
  kernel is transposed by ``p`` too: the stem, downsampling and depthwise
  kernels of a ConvNeXt, and the convolutions of a segmentation head. Dense
  layers, norms and biases do not see the spatial axes. Valid for the
  project's models because their strided convs tile the input exactly (sizes
  divisible by 32), ``SAME`` padding is symmetric and the linear resizing is
  separable per axis.

  Args:
    params: a parameter tree (ConvNeXt, MultitaskModel, ...), numpy leaves.
    slice_axis: ``'first'`` (no change), ``'last'`` (``p = (2, 1, 0)``: their
      volumes ``(column, row, slice)`` as nibabel/medpy read NIfTI/MHA files,
      ours ``(slice, row, column)``), or a permutation ``p``.

  Returns:
    A new tree (the same leaves where nothing changes).
  """
  axes = _axes(slice_axis)
  if axes == (0, 1, 2):
    return params

  def visit(node):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = visit(v)
      elif k == "kernel" and np.ndim(v) == 5:
        out[k] = np.ascontiguousarray(np.transpose(np.asarray(v), axes + (3, 4)))
      elif k == "kernel" and np.ndim(v) == 4:
        raise ValueError("slice_axis applies to 3-D kernels; this tree has 2-D convolutions")
      else:
        out[k] = v
    return out

  return visit(params)


def _strip_params(params):
  if set(params) == {"params"}:
    params = params["params"]
  return params


def convnext_config(params) -> Dict[str, Any]:
  """``ConvNeXt`` arguments whose parameter tree is ``params``.

  Args:
    params: a ConvNeXt params tree (or ``{'params': tree}``).

  Returns:
    Dict with ``depths``, ``dims``, ``spatial_dims``, ``in_chans``,
    ``num_classes``, ``head_hidden`` and ``layer_scale_init`` (0.0 when the
    tree has no layer-scale ``gamma``).
  """
  params = _strip_params(params)
  try:
    stages = sorted(int(k[len("stage"):]) for k in params if re.fullmatch(r"stage\d+", k))
    depths = tuple(len(params[f"stage{i}"]) for i in stages)
    dims = tuple(int(params[f"stage{i}"]["block0"]["norm"]["scale"].shape[0]) for i in stages)
    stem = params["stem"]["conv"]["kernel"]
    head = params.get("head", {})
    return dict(
        depths=depths, dims=dims, spatial_dims=stem.ndim - 2, in_chans=int(stem.shape[-2]),
        num_classes=int(head["fc"]["kernel"].shape[-1]) if "fc" in head else None,
        head_hidden=int(head["pre_head"]["kernel"].shape[-1]) if "pre_head" in head else None,
        layer_scale_init=1e-6 if "gamma" in params["stage0"]["block0"] else 0.0)
  except (KeyError, IndexError, AttributeError) as e:
    raise ValueError(f"not a ConvNeXt params tree (top-level keys {sorted(params)}): "
                     f"missing {e}") from e


# ---------------------------------------------------------------- the authors' files

def _upernext_params(decoder: Mapping[str, np.ndarray], dims: Sequence[int], where: str):
  """``seg_head`` params of ``UperNetHead(style='upernext')`` from their UperNeXtDecoder keys.

  Their ``upsample_blocks[j]`` (1^3 conv, LayerNorm, ReLU, upsampling) serves
  stage ``n - 1 - j`` (our ``lateral{n-1-j}``); ``segmentation_head`` indices
  0/1, 3/4 are our ``fuse0``, ``fuse1`` (conv, LayerNorm) and 6 our
  ``classifier``.
  """
  n = len(dims)
  first = decoder.get("upsample_blocks.0.0.weight")
  fuse = decoder.get("segmentation_head.0.weight")
  last = decoder.get("segmentation_head.6.weight")
  if first is None or fuse is None or last is None or np.ndim(fuse) < 3:
    raise ValueError(f"{where}: the decoder is not the authors' UperNeXt decoder (no "
                     f"upsample_blocks.0.0 / segmentation_head.0 / segmentation_head.6 weights); "
                     f"decoder keys: {sorted(decoder)[:8]}")
  channels, kernel, classes, nd = first.shape[0], fuse.shape[-1], last.shape[0], fuse.ndim - 2
  entries = []

  def conv(path, key, out, inp, k):
    entries.append(_Entry(path + ("kernel",), key + ".weight", "conv", (out, inp) + (k,) * nd))
    entries.append(_Entry(path + ("bias",), key + ".bias", "vec", (out,)))

  def norm(path, key, c):
    entries.append(_Entry(path + ("scale",), key + ".weight", "vec", (c,)))
    entries.append(_Entry(path + ("bias",), key + ".bias", "vec", (c,)))

  for i in range(n):
    conv((f"lateral{i}", "conv"), f"upsample_blocks.{n - 1 - i}.0", channels, dims[i], 1)
    norm((f"lateral{i}", "norm"), f"upsample_blocks.{n - 1 - i}.1", channels)
  conv(("fuse0", "conv"), "segmentation_head.0", channels, n * channels, kernel)
  norm(("fuse0", "norm"), "segmentation_head.1", channels)
  conv(("fuse1", "conv"), "segmentation_head.3", channels, channels, kernel)
  norm(("fuse1", "norm"), "segmentation_head.4", channels)
  conv(("classifier",), "segmentation_head.6", classes, channels, kernel)
  expected = {e.torch_key: e for e in entries}
  problems = []
  for title, items in (("missing keys", sorted(set(expected) - set(decoder))),
                       ("unexpected keys", sorted(set(decoder) - set(expected))),
                       ("mis-shaped keys", sorted(
                           f"{k}: {tuple(decoder[k].shape)}, expected {expected[k].torch_shape}"
                           for k in set(expected) & set(decoder)
                           if tuple(decoder[k].shape) != expected[k].torch_shape))):
    if items:
      problems.append(f"{title} ({len(items)}): " + ", ".join("decoder." + i for i in items))
  if problems:
    raise ValueError(f"{where}: the UperNeXt decoder does not match UperNetHead(style='upernext', "
                     f"channels={channels}, fuse_kernel={kernel}) on stages of widths "
                     f"{tuple(dims)}:\n  " + "\n  ".join(problems))
  params: Dict[str, Any] = {}
  for e in entries:
    node = params
    for part in e.flax_path[:-1]:
      node = node.setdefault(part, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(
        _to_flax(e.kind, np.asarray(decoder[e.torch_key], np.float32)))
  return params


def authors_target(config) -> Optional[str]:
  """'severity' or 'detection' from the loss name in an authors' file's config, else None."""
  model_cfg = config.get("modelconfig") if isinstance(config, Mapping) else None
  loss = str(model_cfg.get("loss_fn", "")) if isinstance(model_cfg, Mapping) else ""
  if "_sev" in loss:
    return "severity"
  if "_inf" in loss:
    return "detection"
  return None


def _default_head(num_classes, spatial_dims, has_decoder, config) -> str:
  """The head name of an authors' classifier: what covid3d's stages call that task."""
  if spatial_dims == 2:
    return "imagenet"
  if has_decoder:  # UperNeXt / MultiNeXt: their STOIC probSevere head
    return "stoic_severe"
  target = authors_target(config)
  if target:
    return {"severity": "severity", "detection": "covid"}[target]
  return {4: "severity", 2: "covid"}.get(num_classes, "classification")


def _authors_tree(state: Mapping[str, Any], head: Optional[str], config, where: str):
  state = {k: _as_numpy(k, v) for k, v in _strip_module(state).items()}
  convnext, decoder, other = split_authors_state(state)
  unknown = sorted(k for k in other if not k.startswith(AUTHORS_METADATA + MULTINEXT_EXTRA))
  if unknown:
    raise ValueError(f"{where}: {len(unknown)} keys belong to no part of the authors' models "
                     f"(ConvNeXt, UperNeXt decoder, MultiNeXt extra heads): {unknown[:12]}")
  naming = detect_naming(convnext)
  n = NAMINGS[naming]
  stem = convnext.get(n["stem_conv"] + ".weight")
  fc = convnext.get(n["fc"] + ".weight")
  pre = convnext.get(n["pre_head"] + ".weight")
  spatial_dims = stem.ndim - 2 if stem is not None and stem.ndim > 2 else 3
  num_classes = int(fc.shape[0]) if fc is not None else None
  hidden = int(pre.shape[0]) if pre is not None and num_classes is not None else None
  try:
    net = load_torch_convnext(convnext, spatial_dims, num_classes=num_classes, head_hidden=hidden,
                              in_chans=1)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  tree: Dict[str, Any] = {"backbone": {k: v for k, v in net.items() if k != "head"}}
  if "head" in net:
    tree["head_" + (head or _default_head(num_classes, spatial_dims, bool(decoder), config))] = (
        net["head"])
  if decoder:
    dims = convnext_config(tree["backbone"])["dims"]
    tree["seg_head"] = _upernext_params(decoder, dims, where)
  return tree


def load_authors_checkpoint(source, *, ema: bool = True, slice_axis="first",
                            head: Optional[str] = None, trusted: bool = False):
  """Parameters of a ``MultitaskModel`` from a PyTorch file of Kienzle et al.

  Reads every format their code writes:

  * pretraining (``pretraining/``): ``{'epoch', 'model_state_dict'}`` (their
    sequential steps save the EMA teacher there), and ``{'epoch',
    'model_state_dict', 'model_ema_state_dict', 'optimizer_state_dict',
    'encoder_state_dict'}``; UperNeXt / MultiNeXt keys ``encoder.main_model.*``,
    ``decoder.*`` (MultiNeXt's MosMed/HUST heads are dropped);
  * training checkpoints (``training/``): ``{'model', 'model_ema',
    'optimizer', 'metrics', 'config', 'data_transforms'}``, keys ``main_model.*``;
  * wrapped-up submission files: ``{'config', 'data_transforms', 'model_ema':
    [one state dict per fold]}``;
  * a bare state dict of any of these models, or an official/timm ConvNeXt
    checkpoint (2-D or 3-D).

  Their age/sex ``metadata_*`` layers are dropped (their COV19-CT-DB models
  run without metadata, where those layers are unused).

  Args:
    source: path (.pth/.pt/... needs torch; .safetensors/.npz) or the loaded
      object (a mapping).
    ema: the EMA weights (what the authors evaluate and submit) where a file
      has both; False: the raw weights (an error for a file with EMA only).
    slice_axis: ``'first'``, ``'last'`` or a permutation; see
      ``permute_kernels``. ``'last'`` for their pretrained encoders (trained on
      slice-last NIfTI/STOIC volumes), ``'first'`` for their COV19-CT-DB models.
    head: name of the classifier (``head_<name>``); default: ``stoic_severe``
      for UperNeXt/MultiNeXt, else ``severity``/``covid`` from the file's
      ``config`` (its loss) or the class count (4/2), ``imagenet`` in 2-D.
    trusted: read a torch file with ``weights_only=False`` (only for files
      you trust; by default plain data besides tensors is allowed:
      datetimes, paths, numpy scalars and arrays).

  Returns:
    A tree ``{'backbone': ..., 'head_<name>': ..., 'seg_head': ...}`` (numpy
    float32; ``seg_head`` only with a decoder) for
    ``MultitaskModel(**multitask_config(tree))``; for a submission file a
    list of such trees, one per fold, in the file's order.

  Raises:
    ValueError: a file that fits none of these formats, listing what does not fit.
  """
  obj, where = _read_object(source, trusted)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where} holds a {type(obj).__name__}, not a checkpoint")
  config = obj.get("config")
  lists = [w for w in EMA_WRAPPERS + RAW_WRAPPERS if _is_fold_list(obj.get(w))]
  if lists:
    keys = ("model_ema", "model") if ema else ("model",)
    key = next((k for k in keys if _is_fold_list(obj.get(k))), None)
    if key is None:
      raise ValueError(f"{where} holds per-fold weights only under {lists}; "
                       + ("use ema=True" if not ema else "expected 'model_ema' or 'model'"))
    trees = [_authors_tree(s, head, config, f"{where} fold {i} ({key})")
             for i, s in enumerate(obj[key])]
    return [permute_kernels(t, slice_axis) for t in trees]
  state = _unwrap(obj, ema)
  return permute_kernels(_authors_tree(state, head, config, where), slice_axis)


def multitask_config(params) -> Dict[str, Any]:
  """``MultitaskModel`` arguments whose parameter tree is ``params``.

  Args:
    params: a tree ``{'backbone', 'head_<name>'..., 'seg_head'}`` (or
      ``{'params': tree}``), e.g. from ``load_authors_checkpoint``.

  Returns:
    Dict with ``backbone`` (``ConvNeXt`` arguments, features only), ``heads``
    (name -> classes), ``segmentation``, ``head_hidden`` and ``seg_head``
    (``UperNetHead`` arguments: style, channels, fuse_kernel, num_classes).
  """
  params = _strip_params(params)
  if "backbone" not in params:
    raise ValueError(f"not a MultitaskModel tree (top-level keys {sorted(params)})")
  backbone = convnext_config(params["backbone"])
  backbone.pop("num_classes")
  backbone.pop("head_hidden")
  heads, hidden = {}, set()
  for name, sub in params.items():
    if name.startswith("head_"):
      heads[name[len("head_"):]] = int(sub["fc"]["kernel"].shape[-1])
      hidden.add(int(sub["pre_head"]["kernel"].shape[-1]) if "pre_head" in sub else None)
  if len(hidden) > 1:
    raise ValueError(f"the heads' pre_head widths differ ({hidden}); MultitaskModel shares one")
  seg_head = {}
  seg = params.get("seg_head")
  if seg is not None:
    if "fuse0" in seg:
      fuse = seg["fuse0"]["conv"]["kernel"]
      seg_head = dict(style="upernext", channels=int(fuse.shape[-1]),
                      fuse_kernel=int(fuse.shape[0]))
    else:
      fuse = seg["fpn_bottleneck"]["conv"]["kernel"]
      scales = sorted(int(k[len("ppm"):]) for k in seg if re.fullmatch(r"ppm\d+", k))
      seg_head = dict(style="upernet", channels=int(fuse.shape[-1]),
                      fuse_kernel=int(fuse.shape[0]), pool_scales=tuple(scales))
    seg_head["num_classes"] = int(seg["classifier"]["kernel"].shape[-1])
  return dict(backbone=backbone, heads=heads, segmentation=seg is not None,
              head_hidden=next(iter(hidden)) if hidden else None, seg_head=seg_head)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def export_torch_convnext(params, naming: str = "official") -> Dict[str, np.ndarray]:
  """The PyTorch state dict (official or timm naming) of a ConvNeXt params tree.

  The inverse of ``load_torch_convnext`` (with ``in_chans=None``). Save it with
  ``safetensors.numpy.save_file(state, path)`` or ``np.savez(path, **state)``,
  or load it into a PyTorch model with ``{k: torch.from_numpy(v)}``.

  Args:
    params: ConvNeXt params tree (or ``{'params': tree}``), 2-D or 3-D.
    naming: 'official' or 'timm'.

  Returns:
    Dict torch key -> float32 numpy array in torch layout.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
  params = _strip_params(params)
  cfg = convnext_config(params)
  entries = _layout(naming, cfg["depths"], cfg["dims"], cfg["in_chans"], cfg["spatial_dims"],
                    cfg["num_classes"], cfg["head_hidden"], cfg["layer_scale_init"] > 0)
  leaves = dict(_flatten(params))
  paths = {e.flax_path for e in entries}
  extra = sorted("/".join(p) for p in set(leaves) - paths)
  missing = sorted("/".join(p) for p in paths - set(leaves))
  if extra or missing:
    raise ValueError(f"export_torch_convnext: not a ConvNeXt tree ({cfg}); missing parameters "
                     f"{missing}, unexpected parameters {extra}")
  return {e.torch_key: np.ascontiguousarray(_to_torch(e.kind, np.asarray(leaves[e.flax_path],
                                                                         np.float32)))
          for e in entries}
