"""2-D -> 3-D inflation of ConvNeXt weights (paper section 3.2).

Kernels use the Flax layout: 2-D ``(kH, kW, in, out)``, 3-D ``(kD, kH, kW, in, out)``.
By default the new axis is depth (axis 0), so the 2-D filters lie in the axial
(H, W) plane they were trained on. ``new_axis=2`` is the authors' code, which
appends the new axis last and so lays the 2-D filter in the (D, H) plane.

Modes (``g`` is a Gaussian profile along an axis, centred at (size-1)/2, sigma
= (size//2)/4; the paper writes N(d, D/2, D/8). For the odd 7-tap depthwise
kernels this is the authors' profile; for the even stem (4) and downsampling
(2) kernels their code differs: mean at size//2, and no Gaussian at all below
3 taps; docs/method.md):

* ``full``: the 2-D kernel repeated along the new axis (I3D).
* ``1g``:   the 2-D kernel times ``g`` along the new axis.
* ``2g``:   the 2-D kernel in the plane of the 2-D axes times ``g`` along the
  new axis, plus the same 2-D kernel laid in the plane (first 2-D axis, new
  axis) times ``g`` along the second 2-D axis (two planes, as the code and
  Fig. 1; equation (3) of the paper prints the same plane twice).

Normalisation, one scalar per tensor:
* ``sum`` (default, the authors' code): the 3-D kernel sums to the 2-D
  kernel's sum, so a depth-constant volume gives the 2-D response (full, 1g).
* ``l2`` (the paper's text): the 3-D kernel has the 2-D kernel's L2 norm.
"""
from typing import Any, Mapping, Optional

import jax
import numpy as np

MODES = ("full", "1g", "2g")
NORMS = ("sum", "l2")


def gaussian_profile(size: int, sigma: Optional[float] = None) -> np.ndarray:
  """``(size,)`` centred Gaussian summing to 1; sigma defaults to ``(size // 2) / 4``."""
  if sigma is None:
    sigma = (size // 2) / 4
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  if sigma <= 0:
    g = (np.abs(x) < 0.5 + 1e-9).astype(np.float64)
    g = g if g.sum() > 0 else np.ones(size)
  else:
    g = np.exp(-0.5 * (x / sigma) ** 2)
  return g / g.sum()


def _laid(kernel2d, depth, mode, sigma):
  """Un-normalised 3-D kernel with the new axis in front, profile summing to 1."""
  kh, kw = kernel2d.shape[:2]
  if mode == "full":
    return np.broadcast_to(kernel2d / depth, (depth,) + kernel2d.shape)
  g = gaussian_profile(depth, sigma)
  first = g[:, None, None, None, None] * kernel2d[None]
  if mode == "1g":
    return first
  if not (kh == kw == depth):
    raise ValueError(f"2g inflation needs a cubic result; got a {kh}x{kw} kernel and depth {depth}")
  # K[h, w] laid in the (h, new) plane: value K[h, d] at (d, h, w), weighted by g(w).
  second = np.transpose(kernel2d, (1, 0, 2, 3))[:, :, None] * g[None, None, :, None, None]
  return 0.5 * (first + second)


def inflate_kernel(kernel2d, mode: str, depth: Optional[int] = None, norm: str = "sum",
                   new_axis: int = 0, sigma: Optional[float] = None) -> np.ndarray:
  """Inflates one 2-D kernel ``(kH, kW, in, out)`` to 3-D ``(kD, kH, kW, in, out)``.

  Args:
    kernel2d: 2-D kernel in Flax layout.
    mode: ``full``, ``1g`` or ``2g``.
    depth: size of the new axis (default ``kH``).
    norm: ``sum`` or ``l2`` (see the module docstring).
    new_axis: 0 puts the new axis first (2-D filter in the axial plane); 2
      puts it last (the authors' code).
    sigma: Gaussian width in taps (default ``(depth // 2) / 4``).

  Returns:
    float32 numpy array of the 3-D kernel.
  """
  if mode not in MODES:
    raise ValueError(f"inflation mode {mode!r} is not one of {MODES}")
  if norm not in NORMS:
    raise ValueError(f"inflation norm {norm!r} is not one of {NORMS}")
  if new_axis not in (0, 2):
    raise ValueError(f"new_axis must be 0 (depth, default) or 2 (the authors' code); got {new_axis}")
  k = np.asarray(kernel2d, np.float64)
  if k.ndim != 4:
    raise ValueError(f"expected a 2-D kernel (kH, kW, in, out); got shape {k.shape}")
  depth = k.shape[0] if depth is None else depth
  k3 = np.array(_laid(k, depth, mode, sigma))
  if norm == "l2":
    n3 = np.linalg.norm(k3)
    k3 = k3 * (np.linalg.norm(k) / n3 if n3 > 0 else 0.0)
  # With norm='sum' the profiles above already sum to 1 (2g: each term
  # halved), which keeps the 2-D sum exactly and never divides by a sum near 0.
  if new_axis == 2:
    k3 = np.moveaxis(k3, 0, 2)
  return k3.astype(np.float32)


def _path_str(path):
  return "/".join(str(getattr(p, "key", p)) for p in path)


def inflate_params(params2d: Mapping[str, Any], mode: str, norm: str = "sum", *,
                   new_axis: int = 0, sigma: Optional[float] = None,
                   target: Optional[Mapping[str, Any]] = None):
  """Inflates a whole 2-D ConvNeXt parameter tree to 3-D.

  Every 4-D ``kernel`` (a 2-D conv: stem, downsampling, depthwise, head convs)
  is inflated with ``inflate_kernel``; Linear and LayerNorm weights, biases and
  layer scales are copied unchanged.

  Args:
    params2d: the ``params`` collection of a 2-D model.
    mode, norm, new_axis, sigma: as in ``inflate_kernel``.
    target: optional 3-D tree (arrays or ``jax.ShapeDtypeStruct``) to check
      against; any missing, extra or mis-shaped entry raises one ``ValueError``
      listing them all.

  Returns:
    A nested dict of float32 numpy arrays with the structure of ``params2d``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params2d)
  out = []
  for path, leaf in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    arr = np.asarray(leaf)
    if name == "kernel" and arr.ndim == 4:
      if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{_path_str(path)}: only square kernels are inflated; got {arr.shape}")
      arr = inflate_kernel(arr, mode, norm=norm, new_axis=new_axis, sigma=sigma)
    elif name == "kernel" and arr.ndim not in (2,):
      raise ValueError(f"{_path_str(path)}: kernel of shape {arr.shape} is neither a 2-D conv "
                       "nor a Linear layer; is this tree already 3-D?")
    out.append(arr.astype(np.float32))
  inflated = jax.tree_util.tree_unflatten(treedef, out)
  if target is not None:
    check_tree(inflated, target, "inflated 2-D parameters")
  return inflated


def check_tree(tree, target, what="parameters"):
  """Raises one ``ValueError`` listing missing, unexpected and mis-shaped leaves."""
  got = {_path_str(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want = {_path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shapes = sorted(f"{k}: {got[k]} vs expected {want[k]}"
                  for k in set(got) & set(want) if tuple(got[k]) != want[k])
  if missing or extra or shapes:
    lines = [f"{what} do not match the model:"]
    lines += [f"  missing: {k}" for k in missing]
    lines += [f"  unexpected: {k}" for k in extra]
    lines += [f"  shape: {s}" for s in shapes]
    raise ValueError("\n".join(lines))
