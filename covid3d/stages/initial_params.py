"""A stage's initial parameters: what ``init_from`` names, loaded, inflated and merged.

``load_initial_params`` takes freshly initialised 3-D parameters and replaces
what carries over from the source: an earlier stage's best EMA parameters
(``best_params``, ``covid3d.inference.workdir``) or a checkpoint file
(``read_source``); a 2-D backbone is inflated (``covid3d.inflation``). What the
workdirs hold is ``handoff``'s.
"""
import logging

import jax
import ml_collections
import numpy as np

from covid3d import inflation, weights
from covid3d.inference.workdir import HandOffError, best_params, check_fits
from covid3d.stages import handoff


def _backbone_of(tree):
  """The backbone subtree of a MultitaskModel or ConvNeXt parameter tree."""
  if "backbone" in tree:
    return tree["backbone"]
  return {k: v for k, v in tree.items() if k.startswith(("stem", "down", "stage"))}


def _is_2d(backbone) -> bool:
  return np.ndim(backbone["stem"]["conv"]["kernel"]) == 4


def _same_shapes(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.shape(x) == np.shape(y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _classification_heads(tree) -> dict:
  """name -> classification head subtree.

  ``head_<name>`` of a MultitaskModel, ``head`` of a ConvNeXt.
  """
  return {k: v for k, v in tree.items() if k == "head" or k.startswith("head_")}


def read_source(src: str, slice_axis: str = "first"):
  """The parameter tree ``init_from`` names: a workdir's best EMA parameters, or a checkpoint file.

  A file may be an official/timm ConvNeXt (2-D or 3-D) or any of the authors'
  files (``weights.load_authors_checkpoint``; EMA weights); ``slice_axis='last'``
  maps weights trained on slice-last volumes (the authors' pretrainings).
  """
  handoff.check_source(src)
  if src.endswith(weights.CHECKPOINT_SUFFIXES):
    tree = weights.load_authors_checkpoint(src, slice_axis=slice_axis)
    if isinstance(tree, list):
      raise HandOffError(
          f"{src} holds {len(tree)} fold models (a submission file): convert it with "
          f"python -m covid3d.authors convert {src} OUT, then use init_from=OUT/fold<k> "
          "(or predict with init_from=OUT)")
    return tree
  return best_params(src)


def merge_source(source, params, config: ml_collections.ConfigDict, what: str):
  """Freshly initialised 3-D ``params`` with the parts of ``source`` that carry over.

  * The backbone is taken whole (inflated when ``source`` is 2-D) and must fit exactly.
  * A head of the same name and shapes is taken whole (e.g. reloading a fold).
  * Otherwise, with ``config.model.head_init='carry'`` (the authors' fine-tuning),
    a classification head takes its LayerNorm ``norm`` and ``pre_head`` from the
    source's single classification head where the shapes fit, and keeps its
    fresh classifier ``fc`` (another class count); ``'fresh'`` re-initialises
    every head the source does not hold under the same name. Each choice is logged.

  Raises:
    HandOffError: a backbone that does not fit.
  """
  backbone = _backbone_of(source)
  if _is_2d(backbone):
    inf = config.inflation
    logging.info("inflating the 2-D backbone of %s (%s, norm %s, %s Gaussian)", what, inf.mode,
                 inf.norm, inf.gaussian)
    backbone = inflation.inflate_params(backbone, inf.mode, inf.norm, new_axis=inf.new_axis,
                                        gaussian=inf.gaussian)
  check_fits(backbone, params["backbone"], f"backbone weights of {what}",
             f"is config.model.variant={config.model.variant!r} "
             f"the variant {what} was trained with?")
  out = dict(params, backbone=backbone)
  theirs_heads = _classification_heads(source)
  for name in params:
    if name == "backbone":
      continue
    theirs = source.get(name)
    if theirs is not None and _same_shapes(theirs, params[name]):
      out[name] = theirs
      logging.info("head %s loaded from %s", name, what)
      continue
    donor = next(iter(theirs_heads.values())) if len(theirs_heads) == 1 else None
    if config.model.head_init == "carry" and name.startswith("head_") and donor is not None:
      carried = {k: donor[k] for k in ("norm", "pre_head")
                 if k in donor and k in params[name] and _same_shapes(donor[k], params[name][k])}
      if carried:
        out[name] = dict(params[name], **carried)
        logging.info("head %s: %s loaded from %s's %s, the rest re-initialised", name,
                     " and ".join(sorted(carried)), what, next(iter(theirs_heads)))
        continue
    why = "absent in the source" if theirs is None else "shape differs from the source"
    logging.info("head %s re-initialised (%s)", name, why)
  return out


def load_initial_params(config: ml_collections.ConfigDict, params):
  """Freshly initialised 3-D ``params`` with what carries over from ``config.init_from``.

  ``init_from``: 'random' (``params`` as they are), an earlier stage's workdir
  or a 2-D checkpoint file; see ``merge_source`` for what is taken.

  Raises:
    HandOffError: missing source, or a backbone that does not fit.
  """
  src = config.init_from
  if src in ("", "random"):
    logging.info("init_from=random: all weights freshly initialised")
    return params
  return merge_source(read_source(src, config.init_from_slice_axis), params, config, src)
