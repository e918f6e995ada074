"""Grayscale ImageNet for the 2-D stage, streamed: TFDS array_record -> grain batches.

Flow (docs/data.md, "ImageNet for the 2-D stage"):

  TFDS ``imagenet2012`` data source (array_record, random access, the JPEG
  bytes undecoded; no TensorFlow at read time, `prepare` builds it without
  TensorFlow too)
    -> train: the record indices shuffled per epoch from the seed (grain's
       index shuffle, O(1) memory), cut into global batches of G, the last
       incomplete one of each epoch dropped, repeated
       eval: in order, padded with -1 to a multiple of G
    -> this process's slice of each global batch: positions [p*b, (p+1)*b),
       b = G / process_count
    -> per example (grain reader threads, prefetched): JPEG decode -> gray
       (ITU-R 601 luma) -> train: random resized crop + flip, RandAugment,
       random erasing, each from a generator seeded by (seed, epoch, record);
       eval: resize + centre crop
    -> per batch: mixup / cutmix from a generator seeded by (seed, batch
       number), drawn for the whole global batch so every process agrees

Host memory holds the batches in flight (about ``threads + prefetch`` of
them) and one decoded JPEG per thread, whatever the dataset size; the old
design held the whole split as float32 (1,281,167 x 224^2 x 4 B = 257 GB).

Every process runs the same index pipeline from the same seed, and every
random draw depends only on (seed, epoch, record) or (seed, batch number), so
the global batch, augmentations included, does not depend on the number of
processes, and a run resumed from an iterator state (``{'next_index': k}``,
JSON) continues exactly as an uninterrupted one.

The augmentations follow the official ConvNeXt/DeiT ImageNet recipe (timm
``create_transform`` and ``Mixup``), re-implemented here with PIL and numpy
for one-channel images; the differences are listed in docs/data.md.
"""
from covid3d.data.imagenet.batches import eval_dataset, train_dataset
from covid3d.data.imagenet.mixup import Mixup
from covid3d.data.imagenet.randaugment import (RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS,
                                               RandAugment)
from covid3d.data.imagenet.source import (NAME, NUM_CLASSES, TRAIN_IMAGES, VALIDATION_IMAGES,
                                          open_source, prepare)
from covid3d.data.imagenet.transforms import (EvalTransform, TrainTransform, decode_gray,
                                              gray_normalisation, random_erase,
                                              random_resized_crop_box, resize_center_crop)
