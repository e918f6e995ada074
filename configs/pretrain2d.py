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
  c.augment.crop.p = 0.0              # 2-D training uses no volume augmentation
  # The official ConvNeXt recipe the authors followed (docs/method.md), at batch 4096.
  c.train.learning_rate = 4e-3
  c.train.weight_decay = 0.05
  c.train.schedule = "cosine"
  c.train.warmup_steps = 20 * 312
  c.train.num_steps = 300 * 312
  c.train.batch_size = 4096
  c.train.eval_batch_size = 1024
  c.train.ema_decay = 0.9999
  c = base.finalize(c, arg)
  if arg == "demo":
    c.train.batch_size = 16
    c.train.eval_batch_size = 32
    c.train.warmup_steps = 5
    c.train.learning_rate = 2e-3
  return c
