"""Stage configs: the fields every stage shares, and ``load``, the one loader of ``configs/``.

Each ``configs/<stage>.py`` edits a copy of ``get_config``'s fields, each field
documented by the comment beside its value; override any on the command line,
e.g. ``--config.train.learning_rate=1e-4 --config.model.variant=small``. A
config file's argument, after the colon, is comma-separated words: ``demo``
(``demo()`` below, then the stage's own demo settings: the nano model, 32^3
volumes, phantom data, few steps) and, for a fine-tuning stage, presets (the
authors' submissions and the paper's ablation rows, ``chain.FINETUNE_TARGETS``):
``configs/severity.py:authors3,demo``.

  python -m covid3d.config severity:authors3,demo [--json]

prints the config ``covid3d.main --config=configs/severity.py:authors3,demo``
runs, before the stage resolves it (``stage:NAME`` sources, epochs to steps).
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from covid3d import augment
from covid3d.stages import chain
from covid3d.train import config as train_config
from covid3d.train.config import listed

DEMO = "demo"


class ConfigError(ValueError):
  """A config argument that names no config file, or a word the file does not take."""


def configs_dir() -> Path:
  """The stage configs: the package's copy (a plain install) or ``configs/`` of the checkout."""
  here = Path(__file__).resolve().parent
  return next((d for d in (here / "configs", here.parent / "configs") if d.is_dir()),
              here.parent / "configs")


def load(spec: str) -> ml_collections.ConfigDict:
  """The config ``spec`` names: ``STAGE[:ARG]`` (``configs/STAGE.py``) or ``PATH.py[:ARG]``.

  ``ARG`` goes to the file's ``get_config`` (``demo``, presets); e.g.
  ``load("severity:authors3,demo")`` or ``load("configs/segmia.py")``.

  Raises:
    ConfigError: no such file, or an argument the file does not take.
  """
  name, colon, arg = spec.partition(":")
  path = Path(name) if name.endswith(".py") else configs_dir() / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"{path}: no such file")
  module_spec = importlib.util.spec_from_file_location(f"covid3d_configs_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg if colon else None)


def to_json(c: ml_collections.ConfigDict) -> str:
  """``c`` as JSON, keys sorted, one field a line: what ``--json`` prints."""
  return json.dumps(json.loads(c.to_json_best_effort()), indent=1, sort_keys=True) + "\n"


def get_config(stage: str) -> ml_collections.ConfigDict:
  """The shared fields of a stage config, with the full-size defaults."""
  c = ml_collections.ConfigDict()
  c.stage = stage                     # the config's stage (configs/<stage>.py; chain.STAGES)
  c.seed = 0                          # model initialisation and phantom; train.seed: training
  c.init_from = "random"              # initial weights: 'random'; an earlier stage's workdir
                                      # (its best EMA checkpoint, raw for pretrain2d.hand_on=
                                      # raw; a 2-D one is inflated);
                                      # 'stage:NAME', the workdir NAME beside this one (R/NAME
                                      # for the workdir R/x, the launchers' layout); or a
                                      # checkpoint file (.pth, .pt, .tar, .bin, .ckpt,
                                      # .safetensors, .npz) of a 2-D ConvNeXt (inflated) or of
                                      # the authors' 3-D models
  c.init_from_slice_axis = "first"    # slice axis of the volumes an init_from FILE was trained
                                      # on: 'first' (covid3d, the authors' COV19-CT-DB models)
                                      # or 'last' (the authors' lesion and STOIC pretrainings;
                                      # its 3-D kernels are transposed)
  c.cache_dir = ""                    # cache root (covid3d.cachedir): XLA compilation cache,
                                      # depthwise-backend choices, preprocessed records;
                                      # '' = $COVID3D_CACHE_DIR, else ~/.cache/covid3d
  c.pseudo_labels = ""                # workdir of the pseudolabel stage whose masks segmia and
                                      # multitask train on

  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny"            # nano, tiny, small, base, large (covid3d.models.VARIANTS)
  c.model.drop_path_rate = 0.1        # the authors' effective value (docs/method.md)
  c.model.layer_scale_init = 1e-6
  c.model.head_hidden = 768           # the authors' extra Linear+ReLU before each classifier;
                                      # 0: the official head
  c.model.head_init = "authors"       # a classification head the init_from source lacks:
                                      # 'authors' (their code) takes the source head's
                                      # LayerNorm, and from a 3-D source also its pre_head and
                                      # (same class count) classifier; a segmentation model
                                      # keeps the LayerNorm as final_norm to hand on; 'carry'
                                      # takes the LayerNorm and pre_head from any source;
                                      # 'fresh' re-initialises the whole head (docs/method.md)
  c.model.dwconv_impl = "auto"        # xla, fft, shift, pallas or auto (measured per device, shape)
  c.model.remat = "none"              # none, block, stage: recompute activations to save memory
  c.model.seg_head = ml_collections.ConfigDict()
  c.model.seg_head.style = "upernext"  # upernext (authors) or upernet (Xiao et al. 2018)
  c.model.seg_head.channels = 16
  c.model.seg_head.fuse_kernel = 7
  c.model.seg_head.align_corners = True
  c.model.seg_head.prior = placeholder(float)  # initial lesion probability (focal-loss bias
                                      # init); None: bias 0 (authors)

  c.inflation = ml_collections.ConfigDict()  # how a 2-D checkpoint becomes 3-D (covid3d.inflation);
                                      # with a 3-D workdir as init_from, how its weights were
                                      # inflated: a stage stops when the workdir's config.json
                                      # records another (covid3d.stages.handoff)
  c.inflation.mode = "full"           # full, 1g, 2g
  c.inflation.norm = "sum"            # sum (authors' code), sum_per_slice (their in-loop 1G
                                      # rescale) or l2 (paper's text)
  c.inflation.gaussian = "authors"    # Gaussian of 1g/2g: authors (mean size//2, none below 3
                                      # taps: their code) or centred (mean (size-1)/2 for every
                                      # size); they differ only on the even stem and
                                      # downsampling kernels
  c.inflation.new_axis = 0            # 0: 2-D filters in the axial plane; 2: the authors' code

  c.data = ml_collections.ConfigDict()
  c.data.cov19ctdb_dir = ""           # COV19-CT-DB root (train/, validation/, test/, category CSVs)
  c.data.lesions_dir = ""             # COVID-19-20 lesion set root (*_ct.nii.gz, *_seg.nii.gz)
  c.data.stoic_dir = ""               # STOIC root (data/mha/, metadata/reference.csv)
  c.data.imagenet_dir = ""            # TFDS manual dir of imagenet2012 (pretrain2d)
  c.data.sizes = (256, 224)           # cached cube edges: (crop source, model input)
  c.data.record_dtype = "float16"     # cached volumes: float16, or uint8 = round(255 v) (half the
                                      # bytes read and sent to the devices; voxels differ by up to
                                      # 0.0022, docs/data.md#record-dtype)
  c.data.workers = 0                  # preprocessing processes (0: all cores)
  c.data.records_dir = ""             # one record store for every host (a folder all see, or
                                      # gs://...): each record built by one process, read by all;
                                      # "": <cache_dir>/records, built whole on each host
  c.data.loader_threads = 4           # grain reader threads per host
  c.data.strict = False               # raise on bad input instead of a logged skip
  c.data.mean = 0.3971                # normalisation after scaling to [0, 1]
  c.data.std = 0.3207
  c.data.folds = 5                    # cross-validation folds; 1: no CV (fine-tuning: all training
                                      # scans, selected on the validation partition)
  c.data.fold_seed = 0
  c.data.folds_csv = ""               # a split file instead of making folds: covid3d's
                                      # folds.csv, or the authors' cv5_*.csv
                                      # (patient,Path,Set,Inf,Sev,cv); '' = stratified folds
                                      # from fold_seed
  c.data.val_fraction = 0.2           # held-out share for pretraining stages' validation
  c.data.phantom = False              # generate and use the synthetic phantom
  c.data.phantom_dir = "./covid3d_demo/data"
  c.data.phantom_scans = 64           # scans per dataset of the phantom

  c.augment = augment.default_config()
  c.train = train_config.default_config()
  c.loss = ml_collections.ConfigDict()
  c.loss.balanced = True              # balanced CE (paper) or plain CE
  c.loss.weights = ml_collections.ConfigDict({"classification": 1.0, "segmentation": 1.0})
  return c


def pretraining_config(stage: str, arg, num_steps: int, eval_every: int, num_epochs: float = 0.0,
                       lesion_finetune: bool = False) -> ml_collections.ConfigDict:
  """A 3-D pretraining stage with the authors' recipe.

  Adam lr 1e-5, clip 5, EMA 0.99, best by Dice; their pretraining augmentation
  (no elastic deformation, no quarter turns, noise on the [0, 1] volume); their
  lesion hold-out. ``num_epochs`` > 0 gives the length in epochs, evaluated
  every epoch, as their loops (the demo runs in steps); ``lesion_finetune`` adds
  the ``handoff`` block (``lesion_finetune_config``).
  """
  c = get_config(stage)
  c.data.holdout = "authors"          # how a pretraining stage holds scans out: 'authors'
                                      # (Python's random.Random(holdout_seed).shuffle of the
                                      # scans sorted by id, the first int((1 - fraction) n)
                                      # trained on: their pretraining/data/datasets.py) or
                                      # 'seeded' (a numpy permutation from data.fold_seed)
  c.data.holdout_seed = 42            # the seed of holdout='authors' (theirs: 42)
  c.data.lesion_val_fraction = 0.15   # the lesion set's held-out share: the validation scans
                                      # of segmentation, segmia and the lesion fine-tune
                                      # (theirs: 85/15, 169 + 30 of the 199 COVID-19-20 scans)
  if lesion_finetune:
    c.handoff = lesion_finetune_config()
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-5
  c.train.weight_decay = 0.0
  c.train.clip_norm = 5.0
  c.train.ema_decay = 0.99
  c.train.best_metric = "dice"        # the EMA validation Dice picks the checkpoint handed on
  c.train.best_min_gain = 0.0         # any higher Dice (AUC) replaces the best: their pretraining
  c.augment.elastic.p = 0.0
  c.augment.rot90.p = 0.0
  c.augment.noise.space = "intensity"
  c.train.num_steps = num_steps
  c.train.eval_every = eval_every
  c.train.checkpoint_every = eval_every
  c.train.num_epochs = float(num_epochs)
  c.train.eval_every_epochs = 1.0 if num_epochs else 0.0
  return finalize(c, arg, pretraining_demo)


def lesion_finetune_config() -> ml_collections.ConfigDict:
  """The ``handoff`` block of segmia and multitask: what the stage hands on.

  The authors' rounds end by fine-tuning the student's EMA model on the lesion
  set at a fifth of the learning rate, for half their epochs, best by EMA
  Dice; that model is their final segmia/multitask artefact.
  """
  c = ml_collections.ConfigDict()
  c.lesion_finetune = True            # hand on the student after a further fine-tune on the
                                      # lesion set (theirs; the student trains in <workdir>/student,
                                      # the fine-tune in <workdir>); False: the student itself
  c.learning_rate_factor = 0.2        # the fine-tune's learning rate: train.learning_rate times
                                      # this (theirs: lr / 5)
  c.num_epochs = 59.0                 # the fine-tune's epochs over the lesion training scans,
                                      # evaluated every epoch (theirs: epochs 1..59 of
                                      # MAX_EPOCHS // 2 = 60); 0: train.num_steps // 2 steps,
                                      # evaluated every train.eval_every (the demo)
  return c


def pretraining_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A pretraining demo's length: ``demo``'s steps, and the lesion fine-tune in steps."""
  c.train.num_epochs = c.train.eval_every_epochs = 0.0
  if "handoff" in c:
    c.handoff.num_epochs = 0.0
  return c


def finetune_config(target: str, arg, epochs: int) -> ml_collections.ConfigDict:
  """Fine-tuning for ``target`` (the challenge recipe): ``epochs`` over the training folds.

  ``target`` is the stage: 'severity' (4 classes) or 'detection' (2 classes);
  ``arg`` may name its presets (``chain.target(target).presets``). The steps
  follow from the epochs when a fold starts (``train.num_epochs``, evaluated
  every epoch), on any number of hosts and any batch size.
  """
  c = get_config(target)
  c.augment.noise.space = "input"     # the authors add fine-tuning noise to the normalised input
  c.predict = predict_config()
  c.preset = ",".join(w for w in listed(arg) if w != DEMO)  # the presets of the config
                                      # argument ('' = none), for the report, which puts the
                                      # paper's figure beside a preset's run
  c.train.num_epochs = float(epochs)
  c.train.eval_every_epochs = 1.0
  return finalize(c, arg, demo_steps)


def predict_config() -> ml_collections.ConfigDict:
  """The ``predict`` block: how a fine-tuning workdir's fold ensemble predicts."""
  c = ml_collections.ConfigDict()
  c.folds = ""                        # fold models in the ensemble, comma-separated: '' all, '4'
                                      # the code's fold 5 alone
  c.partitions = "validation,test"    # COV19-CT-DB partitions predicted, comma-separated
  return c


def demo_steps(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A fine-tuning demo's length: 15 fold trainings in the demo, each short, in steps."""
  c.train.num_epochs = c.train.eval_every_epochs = 0.0
  c.train.num_steps = 200
  c.train.eval_every = c.train.checkpoint_every = 100
  return c


def apply_preset(c: ml_collections.ConfigDict, preset: chain.Preset) -> ml_collections.ConfigDict:
  """``c`` set as the fine-tuning ``preset`` says (see ``chain.Preset``)."""
  c.init_from = "random" if preset.init == "random" else f"stage:{preset.source}"
  c.inflation.mode = preset.inflation
  c.inflation.new_axis = preset.new_axis
  c.inflation.norm = preset.norm
  c.augment.rot90.p = preset.rot90
  c.loss.balanced = preset.balanced
  c.data.folds = preset.folds
  c.predict.folds = str(preset.folds - 1) if preset.submission else ""
  return c


def split_string_tuples(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``c`` with each tuple-of-strings field's comma-joined items split, in place.

  ``--config.segmia.partitions=train,`` (the README's spelling) arrives from
  ml_collections as ``('train,',)``; this makes it ``('train',)``.
  """
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      split_string_tuples(value)
    elif isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
      words = tuple(w.strip() for v in value for w in v.split(",") if w.strip())
      if words != value:
        c[key] = words
  return c


def finalize(c: ml_collections.ConfigDict, arg, stage_demo=None) -> ml_collections.ConfigDict:
  """Applies the config-file argument: '' (full size), or comma-separated presets and 'demo'.

  ``demo`` shrinks ``c`` (``demo``, then ``stage_demo``, the stage's own demo
  settings); a preset's choices (``chain.FINETUNE_TARGETS``) then win.
  """
  presets = ({p.name: p for p in chain.target(c.stage).presets} if c.stage in chain.TARGETS
             else {})
  words = listed(arg)
  for word in words:
    if word != DEMO and word not in presets:
      choices = ", ".join([DEMO, *sorted(presets)])
      raise ConfigError(f"unknown config argument {word!r}: use one of {choices} (or nothing)")
  if DEMO in words:
    c = demo(c)
    c = stage_demo(c) if stage_demo else c
  for word in words:
    if word != DEMO:
      c = apply_preset(c, presets[word])
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage config to run on a laptop CPU in about a minute (docs/method.md)."""
  c.model.variant = "nano"
  c.model.head_hidden = 0
  c.model.dwconv_impl = "fft"
  c.model.seg_head.channels = 8
  c.model.seg_head.fuse_kernel = 3
  c.model.seg_head.prior = 0.05       # about the phantom's lesion share of a 32^3 volume
  c.data.sizes = (40, 32)
  c.data.phantom = True
  c.data.phantom_scans = 40
  c.data.workers = 2
  c.data.loader_threads = 2
  c.augment.elastic.sigma = 4.0
  c.train.batch_size = 4
  c.train.eval_batch_size = 8
  c.train.num_steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 20
  c.train.learning_rate = 3e-4
  c.train.ema_decay = 0.9             # a short run needs a short EMA memory
  c.augment.crop.p = 0.0              # a short run loses more to the random crop and the
  c.augment.rot90.p = 0.0             # quarter turns than it gains (docs/method.md)
  return c


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m covid3d.config", allow_abbrev=False,
                                   description="Prints the config a stage runs (before the "
                                   "stage resolves stage:NAME sources and epochs).")
  parser.add_argument("spec", metavar="STAGE[:ARG]",
                      help="a stage's config, e.g. severity:authors3,demo or configs/segmia.py")
  parser.add_argument("--json", action="store_true", help="print JSON (keys sorted)")
  args = parser.parse_args(argv)
  try:
    c = load(args.spec)
  except ValueError as e:   # ConfigError, which a config file raises as covid3d.config's, not
                            # as this __main__ module's
    parser.exit(2, f"{parser.prog}: {e}\n")
  sys.stdout.write(to_json(c) if args.json else str(c))
  return 0


if __name__ == "__main__":
  sys.exit(main())
