"""Stage 1: a 2-D grayscale ConvNeXt (ImageNet via TFDS, a PyTorch import, or phantom slices).

  python -m covid3d.main --config=configs/pretrain2d.py --workdir=R/pretrain2d \
      --config.data.imagenet_dir=/data/imagenet            # or --config.init_from=convnext_tiny.pth
"""
from covid3d import config as base


def get_config(arg=None):
  c = base.get_config("pretrain2d")
  c.pretrain2d = base.ml_collections.ConfigDict()
  c.pretrain2d.image_size = 224       # ImageNet images resized to this square, pixels
  c.pretrain2d.max_examples = 0       # use only the first N training images (0: all)
  c.pretrain2d.max_eval_examples = 0  # evaluate on the first N validation images (0: all)
  c.pretrain2d.tfds_data_dir = ""     # TFDS data dir of imagenet2012 ('': TFDS's default)
  c.pretrain2d.random_crop = True     # random resized crop (False: resize + centre crop); this
                                      # and the fields below to label_smoothing: the data side
                                      # of the official ConvNeXt ImageNet-1k recipe (timm
                                      # names; docs/method.md)
  c.pretrain2d.crop_scale = (0.08, 1.0)    # random resized crop: area fraction range
  c.pretrain2d.crop_ratio = (3 / 4, 4 / 3)  # random resized crop: aspect-ratio range
  c.pretrain2d.hflip = 0.5            # horizontal flip probability
  c.pretrain2d.randaugment = "rand-m9-mstd0.5-inc1"  # timm RandAugment string ('' = none)
  c.pretrain2d.random_erase = 0.25    # random erasing probability
  c.pretrain2d.mixup = 0.8            # mixup Beta alpha (0 = off)
  c.pretrain2d.cutmix = 1.0           # CutMix Beta alpha (0 = off)
  c.pretrain2d.mixup_prob = 1.0       # probability of mixing a batch (or pair)
  c.pretrain2d.mixup_switch_prob = 0.5  # probability of CutMix instead of mixup
  c.pretrain2d.mixup_mode = "batch"   # 'batch' or 'pair'
  c.pretrain2d.label_smoothing = 0.1  # label smoothing of the training loss
  c.pretrain2d.eval_crop_pct = 0.875  # eval: shorter side to size / crop_pct, centre crop
  c.pretrain2d.normalise = "imagenet"  # the 2-D input on ImageNet: 'imagenet' (the authors':
                                      # ImageNet's per-channel RGB mean/std, then gray; for a
                                      # gray pixel (x - 0.4588) / 0.2256) or 'ct' (data.mean,
                                      # data.std: the CT statistics). Phantom slices: always
                                      # data.mean, data.std
  c.pretrain2d.hand_on = "raw"        # what later stages take from this workdir: the 'raw'
                                      # (non-EMA) weights of its best checkpoint, as the
                                      # authors' ImageNet model, or 'ema'
  c.pretrain2d.image_dtype = "float32"  # host batches: float32 in [0, 1], or uint8 (a quarter
                                      # of the bytes; /255 on device)
  c.pretrain2d.prefetch = 4           # batches prefetched per host
  c.pretrain2d.loader_workers = 0     # grain worker processes (0: threads only)
  c.augment.crop.p = 0.0              # 2-D training uses no volume augmentation
  c.model.head_hidden = 0             # the authors' 2-D ImageNet model has no pre_head
  c.train.learning_rate = 4e-3        # the train fields below: the official ConvNeXt recipe
                                      # the authors followed (docs/method.md), at batch 4096
  c.train.weight_decay = 0.05
  c.train.decay_1d = False            # the recipe exempts 1-D parameters from the decay
  c.train.schedule = "cosine"
  c.train.warmup_steps = 20 * 312
  c.train.num_steps = 300 * 312
  c.train.batch_size = 4096
  c.train.eval_batch_size = 1024
  c.train.ema_decay = 0.9999
  c.train.best_min_gain = 0.0         # any higher accuracy replaces the best, as the recipe's
  return base.finalize(c, arg, demo)


def demo(c):
  """The 2-D demo's batches and schedule, after the shared demo settings."""
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.warmup_steps = 5
  c.train.learning_rate = 2e-3
  return c
