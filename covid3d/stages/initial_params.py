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
  """The parameter tree ``init_from`` names: what a workdir hands on, or a checkpoint file.

  A workdir hands on its best EMA parameters, but a ``pretrain2d`` workdir run
  with ``pretrain2d.hand_on='raw'`` its raw ones (``handoff.hands_on_ema``). A
  file may be an official/timm ConvNeXt (2-D or 3-D) or any of the authors'
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
  return best_params(src, ema=handoff.hands_on_ema(src))


HEAD_INITS = ("authors", "carry", "fresh")


def _donor(source, head_init: str):
  """The head a new head takes parts of: the source's one classification head.

  Failing that, with ``head_init='authors'``, the final LayerNorm a
  segmentation-only source kept (``{"norm": source["final_norm"]}``); else None.
  """
  heads = _classification_heads(source)
  if len(heads) == 1:
    return next(iter(heads.values()))
  if head_init == "authors" and not heads and "final_norm" in source:
    return {"norm": source["final_norm"]}
  return None


def _carried_parts(head_init: str, source_is_2d: bool) -> tuple[str, ...]:
  """The parts of the donor head a new classification head takes (``merge_source``)."""
  if head_init == "carry":
    return ("norm", "pre_head")
  if head_init == "authors":
    return ("norm",) if source_is_2d else ("norm", "pre_head", "fc")
  return ()


def merge_source(source, params, config: ml_collections.ConfigDict, what: str):
  """Freshly initialised 3-D ``params`` with the parts of ``source`` that carry over.

  * The backbone is taken whole (inflated when ``source`` is 2-D) and must fit exactly.
  * A head of the same name and shapes is taken whole (e.g. reloading a fold).
  * Otherwise ``config.model.head_init`` says what a classification head takes
    from the source's one classification head (the donor), where the shapes fit:
    'authors' (the authors' code): from a 2-D source its final LayerNorm
    ``norm`` only (their 2-D to 3-D copy skips the head, so ``pre_head`` and
    ``fc`` start fresh); from a 3-D source ``norm``, ``pre_head`` and, with the
    same class count, ``fc`` (their fine-tuning loads the whole encoder and
    replaces the classifier only for another class count). A source without a
    classification head donates the ``final_norm`` it kept, if any.
    'carry' (covid3d's earlier rule): ``norm`` and ``pre_head`` from any source,
    a fresh ``fc``. 'fresh': the whole head is new. Each choice is logged.
  * A model without classification heads (``segmentation``, ``segmia``) keeps the
    donor's ``norm`` as ``final_norm`` with ``head_init='authors'``: their
    segmentation encoder holds the ImageNet final LayerNorm, unused and so
    untrained, and hands it on to fine-tuning. No layer uses ``final_norm``.

  Raises:
    HandOffError: a backbone that does not fit, or an unknown ``head_init``.
  """
  head_init = config.model.head_init
  if head_init not in HEAD_INITS:
    raise HandOffError(f"model.head_init must be one of {HEAD_INITS}, got {head_init!r}")
  backbone = _backbone_of(source)
  source_is_2d = _is_2d(backbone)
  if source_is_2d:
    inf = config.inflation
    logging.info("inflating the 2-D backbone of %s (%s, norm %s, %s Gaussian)", what, inf.mode,
                 inf.norm, inf.gaussian)
    backbone = inflation.inflate_params(backbone, inf.mode, inf.norm, new_axis=inf.new_axis,
                                        gaussian=inf.gaussian)
  check_fits(backbone, params["backbone"], f"backbone weights of {what}",
             f"is config.model.variant={config.model.variant!r} "
             f"the variant {what} was trained with?")
  out = dict(params, backbone=backbone)
  donor = _donor(source, head_init)
  parts = _carried_parts(head_init, source_is_2d)
  for name in params:
    if name == "backbone":
      continue
    theirs = source.get(name)
    if theirs is not None and _same_shapes(theirs, params[name]):
      out[name] = theirs
      logging.info("head %s loaded from %s", name, what)
      continue
    if name.startswith("head_") and donor is not None:
      carried = {k: donor[k] for k in parts
                 if k in donor and k in params[name] and _same_shapes(donor[k], params[name][k])}
      if carried:
        out[name] = dict(params[name], **carried)
        logging.info("head %s: %s loaded from %s, the rest re-initialised (head_init=%s)", name,
                     ", ".join(sorted(carried)), what, head_init)
        continue
    why = "absent in the source" if theirs is None else "shape differs from the source"
    logging.info("head %s re-initialised (%s)", name, why)
  if (head_init == "authors" and not _classification_heads(params) and donor is not None
      and "norm" in donor):
    out["final_norm"] = donor["norm"]
    logging.info("final LayerNorm of %s kept (unused here, handed on to fine-tuning)", what)
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
