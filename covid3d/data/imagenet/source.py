"""The TFDS ``imagenet2012`` data source: prepared without TensorFlow, read as array_record.

Random access, the JPEG bytes undecoded; no TensorFlow at read time, and
`prepare` builds the dataset from the ImageNet 2012 archives without
TensorFlow too.
"""
import io
import os
import tarfile

from PIL import Image

NAME = "imagenet2012"
NUM_CLASSES = 1000
TRAIN_IMAGES = 1_281_167             # ImageNet-1k training split
VALIDATION_IMAGES = 50_000


def _builder_class():
  """The TFDS imagenet2012 builder, preparing without TensorFlow.

  The official builder (same name, version and features, so the prepared
  dataset is the one ``tfds.data_source('imagenet2012')`` reads) lists its
  archives with ``tf.io.gfile`` and fixes its 23 CMYK/PNG images with
  ``tf.image``; here the archives are read with ``tarfile`` and the images
  fixed with PIL.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=g-import-not-at-top
      imagenet2012_dataset_builder as official)

  class Builder(official.Builder, skip_registration=True):
    """imagenet2012 from ILSVRC2012_img_{train,val}.tar, without TensorFlow."""
    name = NAME

    def _split_generators(self, dl_manager):
      manual = str(dl_manager.manual_dir)
      splits = {}
      train = os.path.join(manual, "ILSVRC2012_img_train.tar")
      val = os.path.join(manual, "ILSVRC2012_img_val.tar")
      if os.path.exists(train):
        splits["train"] = self._generate_examples(_iter_tar(train))
      if os.path.exists(val):
        splits["validation"] = self._generate_examples(
            _iter_tar(val), validation_labels=_validation_labels(val))
      if not splits:
        raise FileNotFoundError(
            f"{manual} has neither ILSVRC2012_img_train.tar nor ILSVRC2012_img_val.tar "
            "(the ImageNet 2012 archives from https://image-net.org/download-images)")
      return splits

    def _fix_image(self, image_fname, image):
      if image_fname in official.CMYK_IMAGES or image_fname in official.PNG_IMAGES:
        out = io.BytesIO()
        Image.open(image).convert("RGB").save(out, "JPEG", quality=100)
        out.seek(0)
        return out
      return image

  del tfds
  return Builder


def _iter_tar(path):
  """(member base name, file object) of each file of a tar archive, streamed."""
  with tarfile.open(path, "r|*") as tar:
    for member in tar:
      if member.isfile():
        yield os.path.basename(member.name), tar.extractfile(member)


def _validation_labels(val_tar: str) -> dict:
  """Validation image name -> label name, as the official builder (sorted names)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  labels = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)  # pylint: disable=protected-access
  labels = labels.read_text().strip().splitlines()
  with tarfile.open(val_tar, "r:*") as tar:
    names = sorted(os.path.basename(n) for n in tar.getnames())
  # The real archive has all 50,000 labelled names; a smaller one the first of them.
  return dict(zip(names, labels[:len(names)], strict=True))


def prepare(manual_dir: str, data_dir: str | None = None):
  """Builds the TFDS ``imagenet2012`` array_record dataset, without TensorFlow.

  Args:
    manual_dir: holds ILSVRC2012_img_train.tar and/or ILSVRC2012_img_val.tar.
    data_dir: TFDS data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    The prepared builder. A dataset already prepared there is left as it is.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _builder_class()(data_dir=data_dir or None, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder


def open_source(split: str, manual_dir: str = "", data_dir: str | None = None,
                prepare_if_missing: bool = True):
  """Random-access records of an ``imagenet2012`` split, JPEG bytes undecoded.

  Args:
    split: 'train' or 'validation'.
    manual_dir: the ImageNet archives (`prepare`), used only when the dataset
      is not prepared in `data_dir` yet.
    data_dir: TFDS data dir (None or '': $TFDS_DATA_DIR or ~/tensorflow_datasets).
    prepare_if_missing: prepare it from `manual_dir` when missing.

  Returns:
    A TFDS ArrayRecordDataSource: ``len``, ``[i]`` / ``__getitems__`` ->
    {'image': JPEG bytes, 'label': int, 'file_name': bytes}.

  Raises:
    FileNotFoundError: the dataset is not prepared and cannot be.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_dir or None
  builder = tfds.builder(NAME, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    if not (prepare_if_missing and manual_dir):
      raise FileNotFoundError(
          f"{NAME} is not prepared in {builder.data_dir}: give the folder of the ImageNet "
          "archives (--config.data.imagenet_dir) or prepare it once with "
          "covid3d.data.imagenet.prepare(manual_dir, data_dir)")
    prepare(manual_dir, data_dir)
  return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
