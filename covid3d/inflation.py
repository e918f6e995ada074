"""2-D -> 3-D inflation of ConvNeXt weights (paper section 3.2).

Kernels use the Flax layout: 2-D ``(kH, kW, in, out)``, 3-D ``(kD, kH, kW, in, out)``.
By default the new axis is depth (axis 0), so the 2-D filters lie in the axial
(H, W) plane they were trained on. ``new_axis=2`` is the authors' code, which
appends the new axis last and so lays the 2-D filter in the (D, H) plane.

Modes (``g`` is a Gaussian profile along an axis of ``size`` taps, summing to 1):

* ``full``: the 2-D kernel repeated along the new axis (I3D).
* ``1g``:   the 2-D kernel times ``g`` along the new axis.
* ``2g``:   the 2-D kernel in the plane of the 2-D axes times ``g`` along the
  new axis, plus the same 2-D kernel laid in the plane (first 2-D axis, new
  axis) times ``g`` along the second 2-D axis (two planes, as the code and
  Fig. 1; equation (3) of the paper prints the same plane twice).

The Gaussian (``gaussian=``; sigma is ``(size // 2) / 4`` in both):

* ``authors`` (default; the authors' ``load_params3Dfromparams2D``): mean at
  tap ``size // 2``, i.e. half a tap off-centre for the even 4-tap stem. Below
  3 taps (the 2-tap downsampling) there is no Gaussian: ``1g`` puts the 2-D
  kernel at index ``size // 2`` (= 1) of the new axis and zeros elsewhere;
  ``2g`` puts it in both planes at index ``size // 2`` (the line the planes
  share holds the 2-D value once, not twice) and then scales the whole tensor
  so its sum is the 2-D kernel's sum (``norm='l2'``: its L2 norm).
  For the odd 7-tap depthwise kernels this is the centred Gaussian.
* ``centred``: mean ``(size - 1) / 2`` and a Gaussian for every size (symmetric;
  used by covid3d before the authors' rule was reproduced).

Normalisation, one scalar per tensor (``norm=``):

* ``sum`` (default): the 3-D kernel sums to the 2-D kernel's sum, so a
  depth-constant volume gives the 2-D response (full, 1g).
* ``sum_per_slice``: the authors' ``1g`` exactly: their sum rescale sits inside
  the loop over the slices of the new axis, so after writing slice ``d`` the
  whole tensor is scaled back to the 2-D sum. The result still sums to the 2-D
  sum, but the profile is distorted (for 7 taps about
  ``0.24, 0.007, 0.10, 0.34, 0.28, 0.028, 0.0003`` instead of a Gaussian
  peaking at 3). For ``full`` and ``2g`` it equals ``sum``.
* ``l2`` (the paper's text): the 3-D kernel has the 2-D kernel's L2 norm.

``gaussian='authors', norm='sum_per_slice', new_axis=2`` is the authors' code
for every mode and kernel size (their ``one_g``, ``two_g``, ``full``), to float
rounding (tests/models/test_inflation.py holds a NumPy transcription of their function).
"""
from typing import Any, Mapping, Optional

import jax
import numpy as np

MODES = ("full", "1g", "2g")
NORMS = ("sum", "sum_per_slice", "l2")
GAUSSIANS = ("authors", "centred")


def _check_gaussian(gaussian):
  if gaussian not in GAUSSIANS:
    raise ValueError(f"inflation gaussian {gaussian!r} is not one of {GAUSSIANS}")


def gaussian_profile(size: int, sigma: Optional[float] = None, gaussian: str = "authors",
                     per_slice: bool = False) -> np.ndarray:
  """``(size,)`` profile along the new axis, summing to 1.

  Args:
    size: number of taps.
    sigma: Gaussian width in taps; default ``(size // 2) / 4``.
    gaussian: ``authors`` (mean ``size // 2``; below 3 taps a one-hot at
      ``size // 2``) or ``centred`` (mean ``(size - 1) / 2``, every size).
    per_slice: the authors' 1g loop: after writing each slice the profile is
      rescaled to sum 1 (see the module docstring).
  """
  _check_gaussian(gaussian)
  sigma = (size // 2) / 4 if sigma is None else sigma
  x = np.arange(size, dtype=np.float64) - (size // 2 if gaussian == "authors" else (size - 1) / 2)
  if sigma <= 0 or (gaussian == "authors" and size < 3):
    # No Gaussian: a delta at the mean (flat if the mean falls between taps).
    g = (np.abs(x) < 0.5 + 1e-9).astype(np.float64)
    g = g if g.sum() > 0 else np.ones(size)
    per_slice = per_slice and g.sum() > 1  # one slice: their loop changes nothing
  else:
    g = np.exp(-0.5 * (x / sigma) ** 2)  # peak 1 at the mean, as their normal()
  if per_slice:
    p = np.zeros(size)
    for d in range(size):  # their loop, on the profile: write slice d, rescale all
      p[d] = g[d]
      p /= p.sum()
    return p
  return g / g.sum()


def _laid(kernel2d, depth, mode, sigma, gaussian, per_slice):
  """3-D kernel with the new axis in front, and whether it still needs a sum rescale.

  Except for the authors' small-kernel 2g, the profiles sum to 1 (2g: each term
  halved), which keeps the 2-D sum exactly and never divides by a sum near 0.
  """
  kh, kw = kernel2d.shape[:2]
  if mode == "full":
    return np.broadcast_to(kernel2d / depth, (depth,) + kernel2d.shape), False
  if mode == "2g" and not (kh == kw == depth):
    raise ValueError(f"2g inflation needs a cubic result; got a {kh}x{kw} kernel and depth {depth}")
  g = gaussian_profile(depth, sigma, gaussian, per_slice=per_slice and mode == "1g")
  first = g[:, None, None, None, None] * kernel2d[None]
  if mode == "1g":
    return first, False
  # K[h, w] laid in the (h, new) plane: value K[h, d] at (d, h, w), weighted by g(w).
  moved = np.transpose(kernel2d, (1, 0, 2, 3))[:, :, None]
  if gaussian == "authors" and depth < 3:
    # The authors' fallback: both planes at index depth // 2, written (not added),
    # so their shared line holds K once; then one whole-tensor rescale.
    c = depth // 2
    k3 = np.zeros((depth,) + kernel2d.shape)
    k3[c] = kernel2d
    k3[:, :, c] = moved[:, :, 0]
    return k3, True
  return 0.5 * (first + moved * g[None, None, :, None, None]), False


def inflate_kernel(kernel2d, mode: str, depth: Optional[int] = None, norm: str = "sum",
                   new_axis: int = 0, sigma: Optional[float] = None,
                   gaussian: str = "authors") -> np.ndarray:
  """Inflates one 2-D kernel ``(kH, kW, in, out)`` to 3-D ``(kD, kH, kW, in, out)``.

  Args:
    kernel2d: 2-D kernel in Flax layout.
    mode: ``full``, ``1g`` or ``2g``.
    depth: size of the new axis (default ``kH``).
    norm: ``sum``, ``sum_per_slice`` or ``l2`` (see the module docstring).
    new_axis: 0 puts the new axis first (2-D filter in the axial plane); 2
      puts it last (the authors' code).
    sigma: Gaussian width in taps (default ``(depth // 2) / 4``).
    gaussian: ``authors`` or ``centred`` (see the module docstring).

  Returns:
    float32 numpy array of the 3-D kernel.
  """
  if mode not in MODES:
    raise ValueError(f"inflation mode {mode!r} is not one of {MODES}")
  if norm not in NORMS:
    raise ValueError(f"inflation norm {norm!r} is not one of {NORMS}")
  _check_gaussian(gaussian)
  if new_axis not in (0, 2):
    raise ValueError("new_axis must be 0 (depth, default) or 2 (the authors' code); "
                     f"got {new_axis}")
  k = np.asarray(kernel2d, np.float64)
  if k.ndim != 4:
    raise ValueError(f"expected a 2-D kernel (kH, kW, in, out); got shape {k.shape}")
  depth = k.shape[0] if depth is None else depth
  k3, rescale = _laid(k, depth, mode, sigma, gaussian, norm == "sum_per_slice")
  k3 = np.array(k3)
  if norm == "l2":
    n3 = np.linalg.norm(k3)
    k3 = k3 * (np.linalg.norm(k) / n3 if n3 > 0 else 0.0)
  elif rescale:
    # The authors' code: one factor for the whole tensor, as they compute it
    # (it follows the 2-D sum whatever it is, even when the 3-D sum is near 0).
    s3 = k3.sum()
    k3 = k3 * (k.sum() / s3 if s3 != 0 else 0.0)
  if new_axis == 2:
    k3 = np.moveaxis(k3, 0, 2)
  return k3.astype(np.float32)


def _path_str(path):
  return "/".join(str(getattr(p, "key", p)) for p in path)


def inflate_params(params2d: Mapping[str, Any], mode: str, norm: str = "sum", *,
                   new_axis: int = 0, sigma: Optional[float] = None,
                   gaussian: str = "authors", target: Optional[Mapping[str, Any]] = None):
  """Inflates a whole 2-D ConvNeXt parameter tree to 3-D.

  Every 4-D ``kernel`` (a 2-D conv: stem, downsampling, depthwise, head convs)
  is inflated with ``inflate_kernel``; Linear and LayerNorm weights, biases and
  layer scales are copied unchanged.

  Args:
    params2d: the ``params`` collection of a 2-D model.
    mode, norm, new_axis, sigma, gaussian: as in ``inflate_kernel``.
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
      arr = inflate_kernel(arr, mode, norm=norm, new_axis=new_axis, sigma=sigma,
                           gaussian=gaussian)
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
