"""Official and timm PyTorch ConvNeXt state dicts as ``covid3d.models.ConvNeXt`` parameters.

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
The ConvNeXt inside the authors' models is found under their key prefixes
(``split_authors_state``).
"""
import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from covid3d.weights.files import _strip_module, read_state_dict
from covid3d.weights.slice_axis import permute_kernels

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
# Key prefixes of the authors' models: UperNeXt/MultiNeXt encoder, and their ConvNeXt3dSTOIC.
AUTHORS_PREFIXES = ("encoder.main_model.", "main_model.")
# Their age/sex layers (unused without metadata, as in their COV19-CT-DB models).
AUTHORS_METADATA = ("metadata_prehead.", "metadata_embedding.")


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

  for i, (depth, c) in enumerate(zip(depths, dims, strict=True)):
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



def split_authors_state(state: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any],
                                                           Dict[str, Any]]:
  """Splits a state dict of the authors' models into (ConvNeXt, decoder, other) parts.

  ``encoder.main_model.*`` (UperNeXt, MultiNeXt) or ``main_model.*``
  (ConvNeXt3dSTOIC) keys become the ConvNeXt part without the prefix;
  ``decoder.*`` keys the decoder part without ``decoder.``; everything else,
  and the ConvNeXt's age/sex ``metadata_*`` layers, the other part. A state
  dict without these prefixes (a bare ``ConvNeXt3d``, or an official/timm
  ConvNeXt) is all ConvNeXt but for those ``metadata_*`` layers.
  """
  state = _strip_module(state)
  prefix = next((p for p in AUTHORS_PREFIXES if any(k.startswith(p) for k in state)), "")
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
    ignore: key prefixes to drop before matching (e.g. ``("pre_head.",)``).
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

