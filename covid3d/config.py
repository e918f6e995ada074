"""The fields every stage config shares; each ``configs/<stage>.py`` edits a copy.

Every field is documented here; override any on the command line, e.g.
``--config.train.learning_rate=1e-4 --config.model.variant=small``.
The ``:demo`` argument of a stage file (``configs/severity.py:demo``) calls
``demo()`` below: the nano model, 32^3 volumes, phantom data, few steps. A
fine-tuning file also takes presets (``configs/severity.py:authors3``, the
authors' submissions and the paper's ablation rows; ``finetune_preset``),
combinable with ``demo``: ``configs/severity.py:authors3,demo``.
"""
import ml_collections

from covid3d import augment
from covid3d.train import config as train_config


def get_config(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Which stage runs (covid3d.stages.registry): pretrain2d, segmentation,
  # pseudolabel, segmia, multitask, severity, detection, predict.
  c.stage = stage
  # Seeds the model initialisation and the phantom; train.seed seeds training.
  c.seed = 0
  # Where the initial weights come from: 'random'; an earlier stage's workdir
  # (its best EMA checkpoint; a 2-D one is inflated); 'stage:NAME', the workdir
  # NAME beside this one (R/NAME for the workdir R/x, the launchers' layout);
  # or a checkpoint file (.pth, .pt, .tar, .bin, .ckpt, .safetensors, .npz) of a 2-D
  # ConvNeXt (inflated) or of the authors' 3-D models.
  c.init_from = "random"
  # Slice axis of the volumes an init_from checkpoint FILE was trained on:
  # 'first' (covid3d, the authors' COV19-CT-DB models) or 'last' (the authors'
  # lesion and STOIC pretrainings); 'last' transposes its 3-D kernels.
  c.init_from_slice_axis = "first"
  # The cache root (covid3d.cachedir): XLA compilation cache, depthwise-backend
  # choices, preprocessed records. '' = $COVID3D_CACHE_DIR, else ~/.cache/covid3d.
  c.cache_dir = ""
  # Workdir of the pseudolabel stage whose masks segmia/multitask train on.
  c.pseudo_labels = ""

  c.model = ml_collections.ConfigDict()
  c.model.variant = "tiny"            # nano, tiny, small, base, large (covid3d.models.VARIANTS)
  c.model.drop_path_rate = 0.1        # the authors' effective value (docs/method.md)
  c.model.layer_scale_init = 1e-6
  # The authors' extra Linear+ReLU before each classifier; 0: the official head.
  c.model.head_hidden = 768
  # A classification head the init_from source lacks: 'carry' takes the source
  # head's LayerNorm and pre_head (the authors' fine-tuning), re-initialising the
  # classifier; 'fresh' re-initialises the whole head.
  c.model.head_init = "carry"
  c.model.dwconv_impl = "auto"        # xla, fft, shift, pallas or auto (measured per device, shape)
  c.model.remat = "none"              # none, block, stage: recompute activations to save memory
  c.model.seg_head = ml_collections.ConfigDict()
  c.model.seg_head.style = "upernext"  # upernext (authors) or upernet (Xiao et al. 2018)
  c.model.seg_head.channels = 16
  c.model.seg_head.fuse_kernel = 7
  c.model.seg_head.align_corners = True
  # Initial lesion probability (focal-loss bias init); None: bias 0 (authors).
  c.model.seg_head.prior = ml_collections.config_dict.placeholder(float)

  # How a 2-D checkpoint becomes 3-D (covid3d.inflation).
  c.inflation = ml_collections.ConfigDict()
  c.inflation.mode = "full"           # full, 1g, 2g
  # sum (authors' code), sum_per_slice (their in-loop 1G rescale) or l2 (paper's text)
  c.inflation.norm = "sum"
  # Gaussian of 1g/2g: authors (mean size//2, none below 3 taps: their code) or
  # centred (mean (size-1)/2 for every size). They differ only on the even stem
  # and downsampling kernels.
  c.inflation.gaussian = "authors"
  c.inflation.new_axis = 0            # 0: 2-D filters in the axial plane; 2: the authors' code

  c.data = ml_collections.ConfigDict()
  c.data.cov19ctdb_dir = ""           # COV19-CT-DB root (train/, validation/, test/, category CSVs)
  c.data.lesions_dir = ""             # COVID-19-20 lesion set root (*_ct.nii.gz, *_seg.nii.gz)
  c.data.stoic_dir = ""               # STOIC root (data/mha/, metadata/reference.csv)
  c.data.imagenet_dir = ""            # TFDS manual dir of imagenet2012 (pretrain2d)
  c.data.sizes = (256, 224)           # cached cube edges: (crop source, model input)
  c.data.workers = 0                  # preprocessing processes (0: all cores)
  c.data.loader_threads = 4           # grain reader threads per host
  c.data.strict = False               # raise on bad input instead of a logged skip
  c.data.mean = 0.3971                # normalisation after scaling to [0, 1]
  c.data.std = 0.3207
  c.data.folds = 5                    # cross-validation folds; 1: no CV (fine-tuning: all training
                                      # scans, selected on the validation partition)
  c.data.fold_seed = 0
  # A split file to use instead of making folds: covid3d's folds.csv, or the
  # authors' cv5_*.csv (patient,Path,Set,Inf,Sev,cv). '' = stratified folds from fold_seed.
  c.data.folds_csv = ""
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


def pretraining_config(stage: str, arg, num_steps: int,
                       eval_every: int) -> ml_collections.ConfigDict:
  """A 3-D pretraining stage with the authors' recipe.

  Adam lr 1e-5, clip 5, EMA 0.99, best by Dice.
  """
  c = get_config(stage)
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-5
  c.train.weight_decay = 0.0
  c.train.clip_norm = 5.0
  c.train.ema_decay = 0.99
  c.train.best_metric = "dice"       # the EMA validation Dice picks the checkpoint handed on
  # The authors' pretraining augmentation: no elastic deformation, no quarter
  # turns, noise on the [0, 1] volume.
  c.augment.elastic.p = 0.0
  c.augment.rot90.p = 0.0
  c.augment.noise.space = "intensity"
  c.train.num_steps = num_steps
  c.train.eval_every = eval_every
  c.train.checkpoint_every = eval_every
  return finalize(c, arg)


def finetune_config(target: str, arg, epochs: int, presets=None) -> ml_collections.ConfigDict:
  """Fine-tuning for ``target`` (the challenge recipe): ``epochs`` over the training folds.

  ``target`` is the stage: 'severity' (4 classes) or 'detection' (2 classes);
  ``presets``: name -> ``finetune_preset(...)``, the names ``arg`` may hold.
  The steps follow from the epochs when a fold starts (``train.num_epochs``,
  evaluated every epoch), on any number of hosts and any batch size.
  """
  c = get_config(target)
  c.augment.noise.space = "input"     # the authors add fine-tuning noise to the normalised input
  c.predict = ml_collections.ConfigDict()
  # Fold models in the ensemble, comma-separated: '' all, '4' the code's fold 5 alone.
  c.predict.folds = ""
  c.predict.partitions = "validation,test"  # COV19-CT-DB partitions predicted, comma-separated
  # The preset the config file's argument named (``finetune_preset``; '' = none),
  # recorded for the report, which puts the paper's figure beside a preset's run.
  c.preset = ""
  c.train.num_epochs = float(epochs)
  c.train.eval_every_epochs = 1.0
  c = finalize(c, arg, presets)
  c.preset = ",".join(w for w in listed(arg) if w != "demo")
  if "demo" in listed(arg):  # 15 fold trainings in the demo: keep each short, in steps
    c.train.num_epochs = c.train.eval_every_epochs = 0.0
    c.train.num_steps = 200
    c.train.eval_every = c.train.checkpoint_every = 100
  return c


def finetune_preset(init: str, inflation: str, *, rot90: float = 0.0, balanced: bool = True,
                    folds: int = 5, submission: bool = True):
  """A fine-tuning preset: one of the authors' challenge runs or the paper's ablation rows.

  ``init`` names the stage whose workdir (beside this one) the run starts from
  ('random', 'pretrain2d', 'segmentation', 'segmia', 'multitask'); ``inflation``
  is how ImageNet weights were inflated (here when ``init`` is 'pretrain2d',
  else when that pretraining ran); ``rot90`` the quarter-turn probability;
  ``balanced`` balanced or plain CE; ``folds`` 5 or 1 (no cross-validation);
  ``submission``: predict with fold 5 alone, as the challenge code did (else
  the 5-fold ensemble, as the paper's tables report).
  """
  def apply(c):
    c.init_from = "random" if init == "random" else f"stage:{init}"
    c.inflation.mode = inflation
    c.augment.rot90.p = rot90
    c.loss.balanced = balanced
    c.data.folds = folds
    c.predict.folds = str(folds - 1) if submission else ""
    return c
  return apply


def listed(value) -> tuple[str, ...]:
  """The words of a comma-separated config string ('' -> (); a list as saved by older runs)."""
  if isinstance(value, (list, tuple)):
    return tuple(str(v) for v in value)
  return tuple(w.strip() for w in str(value or "").split(",") if w.strip())


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


def finalize(c: ml_collections.ConfigDict, arg, presets=None) -> ml_collections.ConfigDict:
  """Applies the config-file argument: '' (full size), or comma-separated presets and 'demo'."""
  presets = presets or {}
  words = listed(arg)
  for word in words:
    if word != "demo" and word not in presets:
      choices = ", ".join(["demo", *sorted(presets)])
      raise ValueError(f"unknown config argument {word!r}: use one of {choices} (or nothing)")
  if "demo" in words:  # the demo sets the scale; a preset's choices then win
    c = demo(c)
  for word in words:
    if word != "demo":
      c = presets[word](c)
  return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage config to run on a laptop CPU in about a minute."""
  c.model.variant = "nano"
  c.model.head_hidden = 0
  c.model.dwconv_impl = "fft"
  c.model.seg_head.channels = 8
  c.model.seg_head.fuse_kernel = 3
  # About the phantom lesion set's lesion share (3.4 % of a 32^3 volume): the
  # segmentation stage's Dice at steps 100/200/300 is 0.14/0.40/0.41 with 0.05,
  # 0.00/0.34/0.39 with 0.01.
  c.model.seg_head.prior = 0.05
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
  # The random 40 -> 32 crop and quarter turns cost a short run more than they
  # give: random-init severity CV macro F1 0.64 with them, 0.75 without.
  c.augment.crop.p = 0.0
  c.augment.rot90.p = 0.0
  return c
