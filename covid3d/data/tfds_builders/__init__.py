"""TFDS builders of the covid3d datasets: array_record files, no TensorFlow.

One module per dataset (`cov19ctdb`, `lesions`, `stoic`, `phantom`), each with
one `ScanRecordBuilder` subclass registered under the module's name. Build with
`build(...)` / `python -m covid3d.data.tfds_builders build NAME ...`, or, where
TensorFlow is installed (the `tfds` command imports it), with
`tfds build covid3d/data/tfds_builders/NAME --manual_dir ... --data_dir ...`.
Read with `covid3d.data.pipeline.tfds_source('NAME/CONFIG', split, data_dir)`.
"""
import importlib

NAMES = ("cov19ctdb", "lesions", "stoic", "phantom")


def builder_class(name: str):
  """The builder class of dataset `name` (one of NAMES)."""
  if name not in NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose from {NAMES}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  importlib.import_module(f"{__name__}.{name}")
  return tfds.builder_cls(name)


def build(name: str, *, data_dir: str, manual_dir: str | None = None,
          download_dir: str | None = None, config=None,
          workers: int | None = None, strict: bool = False,
          overwrite: bool = False):
  """Prepares dataset `name` in `data_dir` (in-process `tfds build`).

  Args:
    name: one of NAMES.
    data_dir: TFDS data dir; the dataset lands in data_dir/name/config/version.
    manual_dir: where the raw data was put (see the builder's
      MANUAL_DOWNLOAD_INSTRUCTIONS); default `<download_dir>/manual`.
    download_dir: downloads and the preprocessing cache; default
      `<data_dir>/downloads`.
    config: config name ('default', 'demo') or a ScanConfig.
    workers: preprocessing processes (None: one per CPU).
    strict: raise on the first bad scan instead of skipping it.
    overwrite: regenerate the dataset even if it is already prepared (the
      preprocessing cache is still reused where it is valid).

  Returns:
    The prepared builder (`.as_data_source()` reads it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = builder_class(name)(data_dir=data_dir, config=config,
                                workers=workers, strict=strict)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else
          tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                   download_mode=mode))
  return builder
