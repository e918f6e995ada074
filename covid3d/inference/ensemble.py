"""The fold ensemble of a fine-tuning workdir: its models, and the mean of their softmax.

A ``severity`` or ``detection`` workdir holds one model per fold in
``fold<k>/``; the ensemble is the folds ``predict.folds`` of its saved config
names (else all), each with its best EMA weights. Its prediction is the mean
of the folds' softmax (the paper's intent).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
import numpy as np

from covid3d.inference import build, workdir
from covid3d.train.config import listed


@dataclasses.dataclass(frozen=True)
class Ensemble:
  """The fold models of a fine-tuning workdir: one ``model``, one params tree per fold."""
  model: Any
  params: list
  folds: tuple
  label: str              # the record label it predicts ('severity' or 'covid')
  names: tuple            # class names, in output order


def fold_dirs(finetune_dir, folds) -> list[epath.Path]:
  """``finetune_dir/fold<k>`` of each of ``folds``.

  Raises:
    HandOffError: a fold without ``DONE``.
  """
  dirs = [epath.Path(finetune_dir) / f"fold{f}" for f in folds]
  missing = [str(d) for d in dirs if not (d / workdir.DONE).exists()]
  if missing:
    raise workdir.HandOffError(
        f"unfinished folds {missing}: run the fine-tuning stage first "
        f"(python -m covid3d.main --config=configs/severity.py --workdir={finetune_dir})")
  return dirs


def load_ensemble(config, finetune_dir) -> Ensemble:
  """The best EMA weights of ``finetune_dir``'s folds (``config.predict.folds``, else all).

  Raises:
    HandOffError: an unfinished fold, or weights that do not fit ``config``'s model.
  """
  stage = workdir.stage_info(finetune_dir).get("stage")
  predicted = workdir.target(stage)
  label, names = predicted.label, predicted.class_names
  folds = (tuple(int(f) for f in listed(config.predict.folds))
           or tuple(range(config.data.folds)))
  params_list = [workdir.best_params(d) for d in fold_dirs(finetune_dir, folds)]
  model = build.make_model(config, {label: len(names)}, segmentation=False)
  like = build.init_params(model, config, min(config.data.sizes))
  for fold, params in zip(folds, params_list, strict=True):
    workdir.check_fits(params, like, f"fold {fold} of {finetune_dir}",
                       f"was it fine-tuned ({stage}, {len(names)} classes) with "
                       f"model.variant={config.model.variant!r}?")
  return Ensemble(model, params_list, folds, label, tuple(names))


def ensemble_fn(config, ensemble: Ensemble, per_fold: bool = False):
  """``(f, leaves)``: ``f(leaves, x)`` the fold ensemble's mean softmax, float32 (B, K) for
  ``x`` float32 (B, s, s, s, 1) in [0, 1] (``per_fold``: each fold's, stacked (F, B, K));
  ``leaves`` the folds' flat weights."""
  apply_fn = build.apply_fn(ensemble.model, config, ensemble.label)
  treedef = jax.tree_util.tree_structure(ensemble.params)

  def f(leaves, x):
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    probs = [jax.nn.softmax(apply_fn(p, x, True, None).astype(jnp.float32), axis=-1)
             for p in params]
    return jnp.stack(probs) if per_fold else jnp.mean(jnp.stack(probs), axis=0)
  return f, tuple(np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(ensemble.params))
