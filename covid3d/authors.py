"""The authors' (Kienzle et al.) submission files as covid3d fine-tuning workdirs.

  python -m covid3d.authors convert SUBMISSION.pth OUT_DIR [--target severity|detection]

Their wrapped-up submission files (``{'config', 'data_transforms', 'model_ema':
[one state dict per fold]}``, e.g. ``checkpoints/sev1.pt`` of their release)
become what covid3d's fine-tuning stage leaves: ``OUT_DIR/config.json`` (the
``severity`` or ``detection`` stage config, its model fields set to their
model), and per fold ``OUT_DIR/fold<k>/checkpoints`` (an Orbax checkpoint of
``{'step', 'params', 'ema_params'}``, both the fold's EMA weights, readable by
``covid3d.stages.initial_params.best_params``) and ``OUT_DIR/fold<k>/DONE``.
``OUT_DIR/authors.json`` keeps their training config and data transforms,
``OUT_DIR/MODEL_CARD.md`` says where the weights come from (``covid3d.model_card``). A
single training checkpoint (``{'model', 'model_ema', ...}``) becomes one fold.
Then ``configs/predict.py`` with ``--config.init_from=OUT_DIR`` predicts with
their ensemble (docs/weights.md, "The authors' checkpoints").
"""
import argparse
import json
import logging
import sys
from collections.abc import Mapping

import ml_collections
import numpy as np
from etils import epath

from covid3d import config as base_config
from covid3d import model_card, storage, weights
from covid3d.models.variants import VARIANTS
from covid3d.inference import workdir
from covid3d.stages import chain, handoff
from covid3d.train import checkpoint

RECORD = model_card.AUTHORS_RECORD   # authors.json
PROG = "python -m covid3d.authors"


def target_config(target: str) -> ml_collections.ConfigDict:
  """The config of stage ``target``: ``configs/<target>.py``."""
  return base_config.load(target)


def infer_target(obj, num_classes: int | None) -> str:
  """``severity`` or ``detection`` from their config's loss name, else from the class count."""
  target = weights.authors_target(obj.get("config"))
  if target:
    return target
  by_count = {len(t.class_names): t.name for t in workdir.PREDICTED.values()}
  if num_classes in by_count:
    return by_count[num_classes]
  raise ValueError(f"cannot tell the target of a {num_classes}-class model: pass --target")


def variant_of(backbone_config: dict) -> str:
  """The ``VARIANTS`` name of a backbone's depths and widths."""
  key = (tuple(backbone_config["depths"]), tuple(backbone_config["dims"]))
  for name, (depths, dims) in VARIANTS.items():
    if (tuple(depths), tuple(dims)) == key:
      return name
  raise ValueError(f"the backbone (depths {key[0]}, dims {key[1]}) is none of covid3d's variants "
                   f"{sorted(VARIANTS)}")


def convert_submission(source, out_dir, *, target: str | None = None,
                       trusted: bool = False) -> dict:
  """Writes the fold ensemble of an authors' submission file as a fine-tuning workdir.

  Args:
    source: path of the submission file (or a training checkpoint: one fold),
      or the loaded mapping.
    out_dir: the new workdir (must hold no fold checkpoints yet).
    target: ``severity`` or ``detection``; default: from their config's loss
      (``*_sev_*`` / ``*_inf_*``), else the class count (4 / 2).
    trusted: read the torch file with ``weights_only=False``.

  Returns:
    Summary: ``target``, ``folds`` (the fold count), ``variant``,
    ``head_hidden``, ``weights`` (``model_ema`` or ``model``), ``out_dir``.

  Raises:
    ValueError: a file that is no fine-tuned classifier of a covid3d variant,
      a class count that does not fit the target, or an ``out_dir`` that
      already holds fold checkpoints.
  """
  obj = weights.read_checkpoint(source, trusted=trusted)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source} holds a {type(obj).__name__}, not a submission file (a dict "
                     "with 'model_ema': one state dict per fold)")
  states, key = weights.fold_states(obj, where=str(source))
  trees = [weights.load_authors_checkpoint({key: s}, ema=key == "model_ema", head="classifier")
           for s in states]
  num_classes = weights.multitask_config(trees[0])["heads"].get("classifier")
  target = target or infer_target(obj, num_classes)
  predicted = workdir.target(target)
  label, names = predicted.label, predicted.class_names
  trees = [{("head_" + label if k == "head_classifier" else k): v for k, v in t.items()}
           for t in trees]
  cfg = weights.multitask_config(trees[0])
  if cfg["segmentation"] or set(cfg["heads"]) != {label}:
    raise ValueError(f"{source}: not a fine-tuned classifier (heads {cfg['heads']}, segmentation "
                     f"head {cfg['segmentation']})")
  if cfg["heads"][label] != len(names):
    raise ValueError(f"{source}: its classifier has {cfg['heads'][label]} classes, the {target} "
                     f"target {len(names)} ({', '.join(names)}); pass the right --target")
  variant = variant_of(cfg["backbone"])

  out = epath.Path(out_dir)
  taken = [str(d) for d in (out / f"fold{k}" / "checkpoints" for k in range(len(trees)))
           if d.exists()]
  if taken:
    raise ValueError(f"{out_dir} already holds fold checkpoints ({taken}): choose a new OUT_DIR")
  config = target_config(target)
  config.model.variant = variant
  config.model.head_hidden = cfg["head_hidden"] or 0
  config.model.layer_scale_init = cfg["backbone"]["layer_scale_init"]
  config.data.folds = len(trees)
  config.init_from = str(source) if not isinstance(source, dict) else "random"
  out.mkdir(parents=True, exist_ok=True)
  storage.write_text(out / "config.json", config.to_json_best_effort(indent=2))
  for fold, tree in enumerate(trees):
    fold_dir = out / f"fold{fold}"
    ckpt = checkpoint.Checkpointer(str(fold_dir / "checkpoints"), keep=1, best_metric=None)
    state = {"step": np.int32(0), "params": tree, "ema_params": _copy(tree)}
    ckpt.save(0, state, {}, config)
    ckpt.wait()
    ckpt.close()
    handoff.mark_done(fold_dir, {"fold": fold, "converted_from": str(source), "weights": key,
                                 "note": "the authors' fold model; params and ema_params are "
                                         f"both their {key!r} weights"})
  summary = {"target": target, "folds": len(trees), "variant": variant,
             "head_hidden": cfg["head_hidden"], "weights": key, "out_dir": str(out)}
  record = dict(summary, source=str(source), config=obj.get("config"),
                data_transforms=obj.get("data_transforms"))
  storage.write_json(out / RECORD, record, indent=1, default=str)
  model_card.write(out, json.loads(config.to_json_best_effort()), None,
                   {"source": str(source)})
  logging.info("wrote %d fold(s) of %s to %s", len(trees), source, out)
  return summary


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else np.array(v, copy=True) for k, v in tree.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="Use the authors' (Kienzle et al.) PyTorch files with covid3d.")
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="a wrapped-up submission file -> a fine-tuning workdir "
                                        "(fold<k>/checkpoints, config.json) for configs/predict.py")
  conv.add_argument("submission", help="their submission file, e.g. checkpoints/sev1.pt")
  conv.add_argument("out_dir", help="the new workdir")
  conv.add_argument("--target", choices=sorted(chain.TARGETS),
                    help="default: from the file's config (loss name) or class count")
  conv.add_argument("--trusted", action="store_true",
                    help="read it with torch.load(weights_only=False): only files you trust")
  args = parser.parse_args(argv)
  try:
    summary = convert_submission(args.submission, args.out_dir, target=args.target,
                                 trusted=args.trusted)
  except (ValueError, KeyError, OSError, ImportError) as e:   # one line, naming the file
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    named = args.submission in reason or args.out_dir in reason
    print(f"{PROG}: {reason if named else f'{args.submission}: {reason}'}", file=sys.stderr)
    return 2
  folds = summary["folds"]
  print(f"wrote {folds} fold model(s) ({summary['target']}, ConvNeXt-{summary['variant']}, "
        f"head_hidden {summary['head_hidden']}) to {summary['out_dir']}\n"
        f"predict with their ensemble:\n"
        f"  python -m covid3d.main --config=configs/predict.py --workdir={args.out_dir}/predict "
        f"--config.init_from={args.out_dir} --config.model.variant={summary['variant']} "
        f"--config.model.head_hidden={summary['head_hidden'] or 0} "
        f"--config.data.folds={folds} --config.data.cov19ctdb_dir=DIR\n"
        f"  (add --config.predict.folds={folds - 1}, for their submissions: their inference used "
        f"only the last fold)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
