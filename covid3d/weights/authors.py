"""The authors' (Kienzle et al.) PyTorch files as ``covid3d.models.MultitaskModel`` parameters.

``load_authors_checkpoint`` reads their pretraining files (``{'epoch',
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
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from covid3d.weights.files import (EMA_WRAPPERS, RAW_WRAPPERS, _as_numpy, _is_fold_list,
                                   _read_object, _strip_module, _unwrap)
from covid3d.weights.slice_axis import permute_kernels
from covid3d.weights.torch_convnext import (AUTHORS_METADATA, NAMINGS, _Entry, _strip_params,
                                            _to_flax, convnext_config, detect_naming,
                                            load_torch_convnext, split_authors_state)

# MultiNeXt's MosMed and HUST heads (unused by their recipe), dropped on import.
MULTINEXT_EXTRA = ("norm_mos.", "pre_head_mos.", "head_mos.", "norm_hust.", "pre_head_hust.",
                   "head_hust.", "metadata_prehead_hust.")


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


def fold_states(obj: Mapping[str, Any], ema: bool = True,
                where: str = "the checkpoint") -> Tuple[List[Mapping[str, Any]], str]:
  """The fold models' state dicts in an authors' file, and the wrapper that holds them.

  A submission file holds one state dict per fold under ``model_ema`` (what
  they submit) and/or ``model``; a training checkpoint one state dict under
  each. ``ema=True`` takes ``model_ema`` where there is one, else ``model``;
  ``ema=False`` only ``model``.

  Args:
    obj: the file's object (``read_checkpoint``).
    ema: as above.
    where: the file, for messages.

  Returns:
    (the state dicts: one per fold in the file's order, or the one of a
    training checkpoint; their wrapper, ``'model_ema'`` or ``'model'``).

  Raises:
    ValueError: neither a submission file nor a training checkpoint of theirs.
  """
  keys = ("model_ema", "model") if ema else ("model",)
  lists = [w for w in EMA_WRAPPERS + RAW_WRAPPERS if _is_fold_list(obj.get(w))]
  if lists:
    key = next((k for k in keys if _is_fold_list(obj.get(k))), None)
    if key is None:
      raise ValueError(f"{where} holds per-fold weights only under {lists}; "
                       + ("use ema=True" if not ema else "expected 'model_ema' or 'model'"))
    return list(obj[key]), key
  key = next((k for k in keys if isinstance(obj.get(k), Mapping)), None)
  if key is None:
    raise ValueError(f"{where} is not a submission file nor a training checkpoint of the authors: "
                     f"no {' or '.join(map(repr, keys))} entry (top-level keys {sorted(obj)[:10]})")
  return [obj[key]], key


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
  if any(_is_fold_list(obj.get(w)) for w in EMA_WRAPPERS + RAW_WRAPPERS):
    states, key = fold_states(obj, ema, where)
    trees = [_authors_tree(s, head, config, f"{where} fold {i} ({key})")
             for i, s in enumerate(states)]
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
